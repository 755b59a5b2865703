"""`mmfusion` console script: evaluate a checkpoint on labelled data, predict with it, inspect, report, export and
serve it.

    mmfusion evaluate runs/mine/best --data.path my_data/ --split test --output metrics.json
    mmfusion predict runs/mine/best --image cat.jpg --text "a photo of a cat"
    mmfusion predict runs/mine/best --input rows.jsonl --output predictions.jsonl
    mmfusion inspect runs/mine/best
    mmfusion report runs/mine
    mmfusion export runs/mine/best --format onnx --output exported/
    mmfusion serve runs/mine/best --port 8000

CHECKPOINT is a directory written by train.py (`output_dir/best`, `output_dir/final`) or a Hugging Face Hub model
id. Bad input (a missing file, an unseen label, a bad option value) prints `mmfusion <command>: error: <message>`
and exits with code 2. Heavy libraries (torch, datasets, accelerate) are imported when a command runs, so --help
answers at once.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from .config import Config, DataConfig
from .errors import BadInputError, DataError, InputError
from .files import write_text
from .options import check_values

Checkpoint = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CHECKPOINT")]


def _positive(option: str, value: int) -> list[str]:
    return [] if value > 0 else [f"{option} must be > 0, got {value}"]


# ----- evaluate -----


@dataclass
class Evaluate:
    """Metrics and confusion matrices of a checkpoint on a labelled split (tasks and labels from the checkpoint)."""

    checkpoint: Checkpoint
    """Checkpoint directory (e.g. runs/mine/best) or Hugging Face Hub model id."""
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "test"
    """Split to evaluate: train, validation or test."""
    output: Annotated[str | None, tyro.conf.arg(metavar="FILE")] = None
    """JSON file for the metrics, confusion matrices and skipped-row counts."""
    batch_size: int = 64
    """Rows per batch."""
    modalities: bool = False
    """Also evaluate with the image removed and with the text removed (the modality-contribution table)."""
    given: tyro.conf.Suppress[frozenset[str]] = frozenset()
    """The options given on the command line (set by `main`): they override the checkpoint's data settings."""

    def run(self) -> int:
        from .data import SPLIT_ALIASES
        from .evaluation import MODALITY_CONDITIONS, checkpoint_data_config, evaluate_checkpoint
        from .formatting import evaluation_record, format_contributions, format_metrics
        from .hub import resolve_checkpoint
        from .model import FusionModel
        from .processing import FusionProcessor

        problems = check_values(Config(data=self.data)) + _positive("--batch_size", self.batch_size)
        if problems:
            raise InputError("; ".join(problems))
        checkpoint = resolve_checkpoint(self.checkpoint)
        model = FusionModel.from_pretrained(checkpoint)
        processor = FusionProcessor.from_pretrained(checkpoint)
        data = checkpoint_data_config(self.data, processor.settings, self.given)
        tasks = model.config.tasks
        split = SPLIT_ALIASES.get(self.split, self.split)
        conditions = MODALITY_CONDITIONS if self.modalities else ("both",)
        result = evaluate_checkpoint(model, processor, data, split, self.batch_size, conditions)
        if not result.main_process:
            return 0
        print(f"{checkpoint} on the {split} split of {data.path}: {result.report.summary()}\n")
        print(format_metrics(result.metrics, tasks, result.confusion_matrices))
        if self.modalities:
            print("\n" + format_contributions({"both": result.metrics, **result.conditions}, tasks))
        if self.output:
            matrices = result.confusion_matrices
            record = evaluation_record(str(checkpoint), split, result.metrics, tasks, matrices, result.report)
            record.update(result.conditions)
            write_text(Path(self.output), json.dumps(record, indent=2) + "\n")
            print(f"\nwrote {self.output}")
        return 0


# ----- predict -----


@dataclass
class Predict:
    """Predictions for one image and/or text, or for every row of a JSON Lines or CSV file."""

    checkpoint: Checkpoint
    """Checkpoint directory (e.g. runs/mine/best) or Hugging Face Hub model id."""
    image: Annotated[str | None, tyro.conf.arg(metavar="PATH")] = None
    """Image file of a single prediction."""
    text: Annotated[str | None, tyro.conf.arg(metavar="TEXT")] = None
    """Text of a single prediction."""
    json: bool = False
    """Print the single prediction as JSON."""
    input: Annotated[str | None, tyro.conf.arg(metavar="FILE")] = None
    """A .jsonl or .csv file of rows to predict; image paths are relative to its directory."""
    output: Annotated[str | None, tyro.conf.arg(metavar="FILE")] = None
    """Where the predictions of --input go, one JSON line per row; None: standard output."""
    image_column: str | None = None
    """--input column with the image path (empty or null: no image); default: the checkpoint's training column."""
    text_column: str | None = None
    """--input column with the text (empty or null: no text); default: the checkpoint's training column."""
    batch_size: int = 64
    """Rows per batch."""

    def run(self) -> int:
        from .formatting import format_prediction
        from .predictor import Predictor

        single = self.image is not None or self.text is not None
        if single == (self.input is not None):
            raise InputError("give --image and/or --text for one prediction, or --input FILE for many")
        problems = _positive("--batch_size", self.batch_size)
        if problems:
            raise InputError(problems[0])
        predictor = Predictor.from_pretrained(self.checkpoint, batch_size=self.batch_size)
        if single:
            prediction = predictor.predict([self.image], [self.text])[0]
            print(json.dumps(prediction, indent=2) if self.json else format_prediction(prediction, predictor.tasks))
            return 0
        path = Path(self.input)
        settings = predictor.processor.settings
        image_column, text_column = self.image_column or settings.image_column, self.text_column or settings.text_column
        rows = read_rows(path, [image_column, text_column])
        images = [row.get(image_column) for row in rows]
        texts = [row.get(text_column) for row in rows]
        try:
            predictions = predictor.predict(images, texts, image_root=path.parent, progress=True)
        except BadInputError as error:
            raise BadInputError(f"{path}: {error}") from None
        lines = [json.dumps({"row": i, "predictions": p}) + "\n" for i, p in enumerate(predictions)]
        if self.output is None:
            sys.stdout.writelines(lines)
        else:
            write_text(Path(self.output), "".join(lines))
            print(f"wrote {len(lines)} predictions to {self.output}", file=sys.stderr)
        return 0


def read_rows(path: Path, columns: list[str]) -> list[dict[str, Any]]:
    """The rows of a .jsonl or .csv file (empty CSV cells are None); each of `columns` must appear in some row."""
    if not path.is_file():
        raise InputError(f"--input file not found: {path}")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = [{key: value or None for key, value in row.items()} for row in csv.DictReader(f)]
    elif path.suffix in (".jsonl", ".json"):
        rows = [_json_row(line, path, number) for number, line in enumerate(path.open(encoding="utf-8"), 1)]
        rows = [row for row in rows if row is not None]
    else:
        raise InputError(f"--input {path}: expected a .jsonl or .csv file")
    if not rows:
        raise DataError(f"{path}: no rows")
    found = {key for row in rows for key in row}
    missing = [column for column in columns if column not in found]
    if missing:
        raise DataError(
            f"{path}: no column {missing} (the rows have {sorted(found)}); set --image_column/--text_column"
        )
    return rows


def _json_row(line: str, path: Path, number: int) -> dict | None:
    """One JSON Lines row (None for a blank line)."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadInputError(f"{path}, line {number}: not valid JSON ({error})") from None
    if not isinstance(row, dict):
        raise BadInputError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
    return row


# ----- inspect -----


@dataclass
class Inspect:
    """Encoders, fusion, tasks and labels, parameter counts, and the metrics of the run that wrote the checkpoint."""

    checkpoint: Checkpoint
    """Checkpoint directory (e.g. runs/mine/best) or Hugging Face Hub model id."""

    def run(self) -> int:
        from .formatting import describe_architecture, describe_run, describe_tasks, parameter_table
        from .hub import resolve_checkpoint
        from .model import MODEL_CONFIG_NAME, FusionModel
        from .processing import FusionProcessor

        checkpoint = resolve_checkpoint(self.checkpoint)
        model = FusionModel.from_pretrained(checkpoint)
        processor = FusionProcessor.from_pretrained(checkpoint)
        version = json.loads((checkpoint / MODEL_CONFIG_NAME).read_text()).get("mmfusion_version", "?")
        print(f"checkpoint {checkpoint} (mmfusion {version})\n")
        print("\n".join(describe_architecture(model.config, processor)) + "\n")
        print("\n".join(describe_tasks(model.config.tasks)) + "\n")
        print("\n".join(parameter_table(model)))
        run_lines = describe_run(checkpoint.parent)
        if run_lines:
            print("\n" + "\n".join(run_lines))
        return 0


# ----- report -----

RunDir = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]


@dataclass
class Report:
    """report.html of a training run: curves, validation metrics, confusion matrices, modality contributions,
    gate values or attention maps, and the most confident errors (figures also in RUN_DIR/report/)."""

    run_dir: RunDir
    """Training output directory (train.output_dir) with config.yaml and metrics.jsonl."""
    checkpoint: str = "best"
    """Checkpoint subdirectory of RUN_DIR to re-evaluate on the validation split (best or final)."""
    data_path: Annotated[str | None, tyro.conf.arg(metavar="PATH")] = None
    """The run's data, when it is no longer at config.yaml's data.path."""
    batch_size: Annotated[int | None, tyro.conf.arg(metavar="INT")] = None
    """Rows per batch of the re-evaluation (default: the run's eval_batch_size, so its numbers match the log's)."""

    def run(self) -> int:
        from .report import FIGURE_DIR, write_report

        if self.batch_size is not None and self.batch_size <= 0:
            raise InputError(f"--batch_size must be > 0, got {self.batch_size}")
        page = write_report(
            Path(self.run_dir), checkpoint=self.checkpoint, data_path=self.data_path, batch_size=self.batch_size
        )
        print(f"wrote {page} (figures in {page.parent / FIGURE_DIR})")
        return 0


# ----- export -----


@dataclass
class Export:
    """Write a checkpoint's model as an ONNX graph, with its config and processor files beside it, and check it
    against torch on a test batch (see mmfusion/export.py for the graph's inputs and outputs)."""

    checkpoint: Checkpoint
    """Checkpoint directory (e.g. runs/mine/best) or Hugging Face Hub model id."""
    output: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """Directory for model.onnx, config.json, processor.json and tokenizer.json."""
    format: Literal["onnx"] = "onnx"
    """Export format."""
    opset: int = 17
    """ONNX opset version."""

    def run(self) -> int:
        from .export import export_onnx

        exported = export_onnx(self.checkpoint, self.output, self.opset)
        print(f"wrote {exported.path} with config.json, processor.json and tokenizer.json beside it")
        print(f"largest |onnxruntime - torch| on a check batch: {exported.max_difference:.2e}")
        return 0


# ----- serve -----


@dataclass
class Serve:
    """An HTTP server for predictions (FastAPI under uvicorn): POST /predict, GET /health, GET /model (see
    mmfusion/serve.py for the request formats)."""

    checkpoint: Checkpoint
    """Checkpoint directory (e.g. runs/mine/best), Hugging Face Hub model id, or with --backend onnx a directory
    written by mmfusion export."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on."""
    backend: Literal["torch", "onnx"] = "torch"
    """Run the model with torch, or the exported graph with onnxruntime."""
    image_root: Annotated[str | None, tyro.conf.arg(metavar="DIR")] = None
    """Directory that JSON requests may name images in (image_path); without it, paths are refused."""
    max_batch: int = 32
    """Most inputs of concurrent requests run in one forward pass."""
    max_wait_ms: float = 5.0
    """How long the first input of a batch waits for others to join it."""
    max_image_bytes: int = 10_000_000
    """Largest accepted image file."""
    max_image_pixels: int = 25_000_000
    """Largest accepted image area (width x height)."""
    max_text_chars: int = 10_000
    """Longest accepted text."""

    def run(self) -> int:
        sizes = {
            "--port": self.port,
            "--max_batch": self.max_batch,
            "--max_image_bytes": self.max_image_bytes,
            "--max_image_pixels": self.max_image_pixels,
            "--max_text_chars": self.max_text_chars,
        }
        problems = [problem for option, value in sizes.items() for problem in _positive(option, value)]
        if self.max_wait_ms < 0:
            problems.append(f"--max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.image_root and not Path(self.image_root).is_dir():
            problems.append(f"--image_root {self.image_root} is not a directory")
        if problems:
            raise InputError("; ".join(problems))
        import uvicorn

        from .hub import resolve_checkpoint
        from .predictor import Predictor
        from .serve import create_app

        checkpoint = str(resolve_checkpoint(self.checkpoint))
        predictor = Predictor.from_pretrained(checkpoint, backend=self.backend)
        uvicorn.run(create_app(predictor, self, checkpoint, self.backend), host=self.host, port=self.port)
        return 0


# ----- entry point -----

COMMANDS = {
    "evaluate": Evaluate,
    "predict": Predict,
    "inspect": Inspect,
    "report": Report,
    "export": Export,
    "serve": Serve,
}


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and its options (bad ones exit 2 with tyro's message), run it, report input errors."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    command = tyro.extras.subcommand_cli_from_dict(
        COMMANDS, prog="mmfusion", description=__doc__, args=argv, use_underscores=True
    )
    if isinstance(command, Evaluate):
        command.given = frozenset(arg.split("=", 1)[0] for arg in argv if arg.startswith("--"))
    name = next(name for name, cls in COMMANDS.items() if isinstance(command, cls))
    try:
        return command.run()
    except (InputError, FileNotFoundError) as error:
        print(f"mmfusion {name}: error: {error}", file=sys.stderr)
        return 2
