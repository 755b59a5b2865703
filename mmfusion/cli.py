"""`mmfusion` console script: evaluate a checkpoint on labelled data, predict with it, inspect, export, serve it.

    mmfusion evaluate runs/mine/best --data.path my_data/ --split test --output metrics.json
    mmfusion predict runs/mine/best --image cat.jpg --text "a photo of a cat"
    mmfusion predict runs/mine/best --input rows.jsonl --output predictions.jsonl
    mmfusion inspect runs/mine/best
    mmfusion report runs/mine
    mmfusion export runs/mine/best --format onnx --output exported/
    mmfusion serve runs/mine/best --port 8000

CHECKPOINT is a directory written by train.py (`output_dir/best`, `output_dir/final`) or a Hugging Face Hub model
id. Bad input (a missing file, an unseen label, a bad option value) prints `mmfusion <command>: error: <message>`
and exits with code 2.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import tyro

from .config import Config, DataConfig, FusionConfig, TaskSpec, check_values
from .errors import BadInputError, DataError, InputError

if TYPE_CHECKING:  # torch, datasets and accelerate are imported when a command runs, so --help starts fast
    from .data import SkipReport
    from .model import FusionModel
    from .processing import FusionProcessor

Checkpoint = Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="CHECKPOINT")]
SHOWN_SCORES = 10  # classes listed per task in a human-readable prediction


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

    def run(self) -> int:
        from .data import SPLIT_ALIASES
        from .hub import resolve_checkpoint
        from .model import FusionModel
        from .processing import FusionProcessor

        problems = check_values(Config(data=self.data)) + _positive("--batch_size", self.batch_size)
        if problems:
            raise InputError("; ".join(problems))
        checkpoint = resolve_checkpoint(self.checkpoint)
        model = FusionModel.from_pretrained(checkpoint)
        processor = FusionProcessor.from_pretrained(checkpoint)
        tasks = model.config.tasks
        split = SPLIT_ALIASES.get(self.split, self.split)
        result = evaluate_checkpoint(model, processor, self.data, split, self.batch_size, self.modalities)
        if not result.main_process:
            return 0
        print(f"{checkpoint} on the {split} split of {self.data.path}: {result.report.summary()}\n")
        print(format_metrics(result.metrics, tasks, result.confusion_matrices))
        if result.ablations:
            print("\n" + format_contributions({"both": result.metrics, **result.ablations}, tasks))
        if self.output:
            record = evaluation_record(
                str(checkpoint), split, result.metrics, tasks, result.confusion_matrices, result.report
            )
            record.update(result.ablations)
            write_text(Path(self.output), json.dumps(record, indent=2) + "\n")
            print(f"\nwrote {self.output}")
        return 0


@dataclass
class Evaluation:
    """One checkpoint on one split: metrics, confusion matrices, the modality ablations and the skipped rows."""

    metrics: dict
    confusion_matrices: dict[str, list[list[int]]]
    ablations: dict[str, dict]
    report: SkipReport
    main_process: bool = True


def evaluate_checkpoint(
    model: FusionModel,
    processor: FusionProcessor,
    data: DataConfig,
    split: str,
    batch_size: int = 64,
    modalities: bool = False,
    source: Any = None,
    cpu: bool = False,
) -> Evaluation:
    """The evaluation of `mmfusion evaluate`, `Predictor.evaluate` and `mmfusion.evaluate`: the checked rows of
    `split` of `source` (default: data.path; or anything `load_dataset` takes), then `evaluation.evaluate`.
    `modalities` adds the runs without the image and without the text; `cpu` keeps accelerate off the GPU."""
    from accelerate import Accelerator

    from .evaluation import MODALITY_ABLATIONS, evaluate
    from .metrics import MultiTaskMetrics
    from .training import loader_workers, make_loader

    tasks = model.config.tasks
    dataset, report = load_split(data, split, processor, tasks, source)
    accelerator = Accelerator(cpu=cpu)
    workers = loader_workers(data, accelerator)
    loader = make_loader(dataset, batch_size, processor.settings.pad_id, False, workers)
    results = MultiTaskMetrics(tasks)
    model, loader = accelerator.prepare(model, loader)
    metrics = evaluate(model, loader, accelerator, tasks, metrics=results)
    ablations = {}
    if modalities:
        for modality in MODALITY_ABLATIONS:
            ablations[f"without_{modality}"] = evaluate(model, loader, accelerator, tasks, remove=modality)
    return Evaluation(metrics, results.confusion_matrices(), ablations, report, accelerator.is_main_process)


def format_contributions(table: dict[str, dict], tasks: list[TaskSpec]) -> str:
    """Each task's primary metric with both modalities, without the image and without the text."""
    from .metrics import PRIMARY_METRIC

    lines = [f"{'task (primary metric)':<32}" + "".join(f"{name:>16}" for name in table)]
    for spec in tasks:
        metric = PRIMARY_METRIC[spec.type][0]
        values = [table[name].get(spec.name, {}).get(metric) for name in table]
        cells = "".join(f"{v:>16.4f}" if v is not None else f"{'-':>16}" for v in values)
        lines.append(f"{f'{spec.name} ({metric})':<32}{cells}")
    return "\n".join(lines)


def _positive(option: str, value: int) -> list[str]:
    return [] if value > 0 else [f"{option} must be > 0, got {value}"]


def load_split(data: DataConfig, split: str, processor: FusionProcessor, tasks: list[TaskSpec], source: Any = None):
    """The checked rows of one split (bad rows raise or are skipped per --data.on_error) and the skip report.
    `source` is anything `load_dataset` takes (default: data.path).

    Labels are encoded with the checkpoint's label maps, so a label the model never saw is a bad row."""
    from .data import FusionDataset, FusionStream, RowReader, SkipReport, check_columns, check_split, load_dataset

    loaded = load_dataset(data.path if source is None else source, data, for_training=False)
    if split not in loaded.splits:
        raise DataError(
            f"{loaded.source}: no {split!r} split; it has {sorted(loaded.splits)} (choose one with --split)"
        )
    rows = loaded.splits[split]
    check_columns(rows, split, tasks, data)
    reader = RowReader(processor, tasks, data, loaded.roots[split], split, data.missing_modality == "placeholder")
    if loaded.streaming:
        stream = FusionStream(rows, reader, data.on_error)
        return stream, stream.report
    report = SkipReport()
    rows = check_split(rows, split, reader, report, data.on_error, data.verify_images)
    return FusionDataset(rows, reader), report


def format_metrics(metrics: dict, tasks: list[TaskSpec], matrices: dict[str, list[list[int]]]) -> str:
    """Each task's metrics, one per line, then its confusion matrix (classification), then the summary."""
    from .predictor import label_names

    lines = []
    for spec in tasks:
        values = metrics[spec.name]
        lines.append(f"{spec.name} ({spec.type}, {values['count']} labelled rows)")
        lines += [f"  {name:<16} {value:.4f}" for name, value in values.items() if name != "count"]
        if spec.name in matrices:
            lines.append("  confusion matrix (rows: true label, columns: predicted label)")
            lines += ["  " + line for line in format_matrix(label_names(spec), matrices[spec.name])]
        lines.append("")
    lines.append(f"summary (mean primary metric): {metrics['summary']:.4f}")
    return "\n".join(lines)


def format_matrix(labels: list[str], matrix: list[list[int]]) -> list[str]:
    """A count table with the label names as row and column headers."""
    names = [label[:12] for label in labels]
    width = max(len(str(count)) for row in matrix for count in row)
    width = max(width, *(len(name) for name in names))
    header = " " * (width + 1) + " ".join(f"{name:>{width}}" for name in names)
    rows = [f"{name:>{width}} " + " ".join(f"{count:>{width}}" for count in row) for name, row in zip(names, matrix)]
    return [header, *rows]


def evaluation_record(checkpoint: str, split: str, metrics: dict, tasks: list[TaskSpec], matrices: dict,
                      report: SkipReport) -> dict:  # fmt: skip
    """What --output holds: metrics, labelled confusion matrices, skipped rows by reason, checkpoint and split."""
    from .predictor import label_names

    names = {spec.name: label_names(spec) for spec in tasks}
    return {
        "checkpoint": checkpoint,
        "split": split,
        "metrics": metrics,
        "confusion_matrices": {task: {"labels": names[task], "matrix": m} for task, m in matrices.items()},
        "skipped": {
            "total": report.total,
            "by_reason": {reason: count for (_, reason), count in sorted(report.counts.items())},
            "examples": report.examples,
        },
        "truncated_texts": sum(report.truncated.values()),
    }


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


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
    image_column: str = "image"
    """--input column with the image path (empty or null: no image)."""
    text_column: str = "caption"
    """--input column with the text (empty or null: no text)."""
    batch_size: int = 64
    """Rows per batch."""

    def run(self) -> int:
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
        rows = read_rows(path, [self.image_column, self.text_column])
        images = [row.get(self.image_column) for row in rows]
        texts = [row.get(self.text_column) for row in rows]
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


def format_prediction(prediction: dict[str, dict], tasks: list[TaskSpec]) -> str:
    """One block per task: the predicted label(s) or value, then the most likely classes with their probability."""
    lines = []
    for spec in tasks:
        result = prediction[spec.name]
        if spec.type == "regression":
            lines.append(f"{spec.name}: {result['value']:.4g}")
            continue
        if spec.type == "matching":
            score = "n/a (image or text missing)" if result["score"] is None else f"{result['score']:.4f}"
            lines.append(f"{spec.name}: image-text similarity {score}")
            continue
        chosen = result["label"] if spec.type == "classification" else ", ".join(result["labels"]) or "(none)"
        lines.append(f"{spec.name}: {chosen}")
        ranked = sorted(result["scores"].items(), key=lambda item: -item[1])
        width = max(len(name) for name, _ in ranked[:SHOWN_SCORES])
        lines += [f"    {name:<{width}}  {p:.3f}" for name, p in ranked[:SHOWN_SCORES]]
        if len(ranked) > SHOWN_SCORES:
            lines.append(f"    ... {len(ranked) - SHOWN_SCORES} more")
    return "\n".join(lines)


# ----- inspect -----


@dataclass
class Inspect:
    """Encoders, fusion, tasks and labels, parameter counts, and the metrics of the run that wrote the checkpoint."""

    checkpoint: Checkpoint
    """Checkpoint directory (e.g. runs/mine/best) or Hugging Face Hub model id."""

    def run(self) -> int:
        from .hub import resolve_checkpoint
        from .model import CONFIG_NAME, FusionModel
        from .processing import FusionProcessor

        checkpoint = resolve_checkpoint(self.checkpoint)
        model = FusionModel.from_pretrained(checkpoint)
        processor = FusionProcessor.from_pretrained(checkpoint)
        version = json.loads((checkpoint / CONFIG_NAME).read_text()).get("mmfusion_version", "?")
        print(f"checkpoint {checkpoint} (mmfusion {version})\n")
        print("\n".join(describe_architecture(model.config, processor)) + "\n")
        print("\n".join(describe_tasks(model.config.tasks)) + "\n")
        print("\n".join(parameter_table(model)))
        run_lines = describe_run(checkpoint.parent)
        if run_lines:
            print("\n" + "\n".join(run_lines))
        return 0


def describe_architecture(config: FusionConfig, processor: FusionProcessor) -> list[str]:
    """One line each for the image encoder, the text encoder (with its tokenizer) and the fusion."""
    image = config.image_encoder
    if image == "simple_cnn":
        image += f" (widths {config.image_widths})"
    if config.image_weights:
        image += f", weights from {config.image_weights}"
    if config.text_encoder == "hf":
        text = f"hf {config.text_model} ({config.text_pooling} pooling)"
    else:
        direction = ", bidirectional" if config.bidirectional and config.text_encoder in ("lstm", "gru") else ""
        text = f"{config.text_encoder} (dim {config.text_dim}, layers {config.text_layers}{direction})"
    frozen = {True: ", frozen", False: ""}
    settings = processor.settings
    return [
        f"image encoder  {image}, {settings.image_size}x{settings.image_size} input{frozen[config.freeze_image]}",
        f"text encoder   {text}, vocabulary {processor.vocab_size}, up to {settings.max_text_length} tokens"
        f"{frozen[config.freeze_text]}",
        f"fusion         {config.fusion} (dim {config.dim}, layers {config.fusion_layers}, dropout {config.dropout})",
    ]


def describe_tasks(tasks: list[TaskSpec]) -> list[str]:
    """Each task's type, column and labels (regression: the target statistics)."""
    from .predictor import label_names

    lines = [f"tasks ({len(tasks)})"]
    for spec in tasks:
        if spec.type == "regression":
            detail = f"target mean {spec.target_mean:.4g}, std {spec.target_std:.4g}"
        elif spec.type == "matching":
            detail = "image-text similarity"
        else:
            detail = f"{spec.out_features} labels: {', '.join(label_names(spec))}"
        lines.append(f"  {spec.name:<16} {spec.type:<15} column {spec.column!r}: {detail}")
    return lines


def parameter_table(model: FusionModel) -> list[str]:
    """Total and trainable parameters of each part of the model and of the whole."""
    parts = {
        "image encoder": list(model.image_encoder.parameters()),
        "text encoder": list(model.text_encoder.parameters()),
        "fusion": list(model.fusion.parameters()),
        "heads": [*model.heads.parameters(), *model.aux_heads.parameters()],
        "placeholders": list(model.placeholders.parameters()),
        "total": list(model.parameters()),
    }
    lines = [f"{'parameters':<16} {'total':>14} {'trainable':>14}"]
    for name, parameters in parts.items():
        total = sum(p.numel() for p in parameters)
        trainable = sum(p.numel() for p in parameters if p.requires_grad)
        lines.append(f"{name:<16} {total:>14,} {trainable:>14,}")
    return lines


def describe_run(run_dir: Path) -> list[str]:
    """The training run's last logged losses, last and best validation, and test metrics, when its files are there."""
    lines = []
    records = _jsonl_records(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split") == "train"]
    validation = [r for r in records if r.get("split") == "validation" and "summary" in r]
    if train:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in train[-1].get("losses", {}).items())
        lines.append(f"  last training log (step {train[-1].get('step')}): {losses}")
    if validation:
        best = max(validation, key=lambda r: r["summary"])
        lines.append(f"  last validation (step {validation[-1].get('step')}): {metrics_line(validation[-1])}")
        lines.append(f"  best validation summary (step {best.get('step')}): {metrics_line(best)}")
    test_file = run_dir / "test_metrics.json"
    if test_file.is_file():
        lines.append(f"  test (best checkpoint): {metrics_line(json.loads(test_file.read_text()))}")
    return [f"training run {run_dir}", *lines] if lines else []


def _jsonl_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file; a line cut short by a crash is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [record for record in records if isinstance(record, dict)]


def metrics_line(metrics: dict) -> str:
    """`summary S | task: metric v, ...` on one line."""
    parts = [f"summary {metrics['summary']:.4f}"] if "summary" in metrics else []
    for task, values in metrics.items():
        if isinstance(values, dict) and "count" in values:
            shown = [f"{k} {v:.4f}" for k, v in values.items() if k != "count" and isinstance(v, float)]
            parts.append(f"{task}: {', '.join(shown) or 'no labels'}")
    return " | ".join(parts)


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
        page = write_report(Path(self.run_dir), self.checkpoint, self.data_path, self.batch_size)
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
    command = tyro.extras.subcommand_cli_from_dict(
        COMMANDS, prog="mmfusion", description=__doc__, args=argv, use_underscores=True
    )
    name = next(name for name, cls in COMMANDS.items() if isinstance(command, cls))
    try:
        return command.run()
    except (InputError, FileNotFoundError) as error:
        print(f"mmfusion {name}: error: {error}", file=sys.stderr)
        return 2
