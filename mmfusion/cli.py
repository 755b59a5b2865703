"""`mmfusion` console script: evaluate a checkpoint on labelled data, predict with it, inspect it.

    mmfusion evaluate runs/mine/best --data.path my_data/ --split test --output metrics.json
    mmfusion predict runs/mine/best --image cat.jpg --text "a photo of a cat"
    mmfusion predict runs/mine/best --input rows.jsonl --output predictions.jsonl
    mmfusion inspect runs/mine/best
    mmfusion report runs/mine

CHECKPOINT is a directory written by train.py (`output_dir/best`, `output_dir/final`) or a Hugging Face Hub model
id. Bad input (a missing file, an unseen label, a bad option value) prints `mmfusion <command>: error: <message>`
and exits with code 2.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro

from .config import Config, DataConfig, FusionConfig, TaskSpec
from .data import SPLIT_ALIASES
from .errors import BadInputError, DataError, InputError
from .evaluation import MODALITY_CONDITIONS, evaluate
from .files import write_text
from .hub import resolve_checkpoint
from .metrics import PRIMARY_METRIC
from .model import MODEL_CONFIG_NAME, FusionModel
from .options import check_values
from .predictor import Predictor, label_names
from .prepare import load_split
from .processing import FusionProcessor, ProcessorSettings
from .report import Report
from .rows import SkipReport, loader_workers, make_loader
from .runlog import RUN_CONFIG_NAME, best_record, describe_model, metrics_line, read_history, read_run_config

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

    given: tyro.conf.Suppress[frozenset[str]] = frozenset()
    """The options given on the command line (set by `main`): they override the checkpoint's data settings."""

    def run(self) -> int:
        from accelerate import Accelerator

        problems = check_values(Config(data=self.data)) + _positive("--batch_size", self.batch_size)
        if problems:
            raise InputError("; ".join(problems))
        checkpoint = resolve_checkpoint(self.checkpoint)
        model = FusionModel.from_pretrained(checkpoint)
        processor = FusionProcessor.from_pretrained(checkpoint)
        data = checkpoint_data_config(self.data, processor.settings, self.given)
        tasks = model.config.tasks
        split = SPLIT_ALIASES.get(self.split, self.split)
        dataset, report = load_split(data, split, processor, tasks)
        accelerator = Accelerator()
        loader = make_loader(
            dataset, self.batch_size, processor.settings.pad_id, False, loader_workers(data, accelerator)
        )
        model, loader = accelerator.prepare(model, loader)
        conditions = MODALITY_CONDITIONS if self.modalities else ("both",)
        results = evaluate(model, loader, accelerator, tasks, conditions)
        metrics = {condition: results[condition].compute() for condition in conditions}
        matrices = results["both"].confusion_matrices()
        if not accelerator.is_main_process:
            return 0
        print(f"{checkpoint} on the {split} split of {data.path}: {report.summary()}\n")
        print(format_metrics(metrics["both"], tasks, matrices))
        if self.modalities:
            print("\n" + format_contributions(metrics, tasks))
        if self.output:
            record = evaluation_record(str(checkpoint), split, metrics["both"], tasks, matrices, report)
            record.update({condition: values for condition, values in metrics.items() if condition != "both"})
            write_text(Path(self.output), json.dumps(record, indent=2) + "\n")
            print(f"\nwrote {self.output}")
        return 0


def checkpoint_data_config(data: DataConfig, settings: ProcessorSettings, given: frozenset[str]) -> DataConfig:
    """The data options as the checkpoint was trained with them (its column names, image root and missing-modality
    policy), except those given on the command line."""
    remembered = {
        name: getattr(settings, name)
        for name in ("image_column", "text_column", "image_root", "missing_modality")
        if f"--data.{name}" not in given
    }
    return dataclasses.replace(data, **remembered)


def format_contributions(table: dict[str, dict], tasks: list[TaskSpec]) -> str:
    """Each task's primary metric with both modalities, without the image and without the text."""
    lines = [f"{'task (primary metric)':<32}" + "".join(f"{name:>16}" for name in table)]
    for spec in tasks:
        metric = PRIMARY_METRIC[spec.type][0]
        values = [table[name].get(spec.name, {}).get(metric) for name in table]
        cells = "".join(f"{v:>16.4f}" if v is not None else f"{'-':>16}" for v in values)
        lines.append(f"{f'{spec.name} ({metric})':<32}{cells}")
    return "\n".join(lines)


def _positive(option: str, value: int) -> list[str]:
    return [] if value > 0 else [f"{option} must be > 0, got {value}"]


def format_metrics(metrics: dict, tasks: list[TaskSpec], matrices: dict[str, list[list[int]]]) -> str:
    """Each task's metrics, one per line, then its confusion matrix (classification), then the summary."""
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


def evaluation_record(
    checkpoint: str, split: str, metrics: dict, tasks: list[TaskSpec], matrices: dict, report: SkipReport
) -> dict:
    """What --output holds: metrics, labelled confusion matrices, skipped rows by reason, checkpoint and split."""
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


def describe_architecture(config: FusionConfig, processor: FusionProcessor) -> list[str]:
    """The model's parts (runlog.describe_model) with what the processor adds: input size, vocabulary, text length."""
    settings = processor.settings
    inputs = {
        "image encoder": f", {settings.image_size}x{settings.image_size} input",
        "text encoder": f", vocabulary {processor.vocab_size}, up to {settings.max_text_length} tokens",
    }
    parts = [(part, text) for part, text in describe_model(config) if part != "tasks"]
    return [f"{part:<14} {text}{inputs.get(part, '')}" for part, text in parts]


def describe_tasks(tasks: list[TaskSpec]) -> list[str]:
    """Each task's type, column and labels (regression: the target statistics)."""
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
    try:
        history = read_history(run_dir)
    except InputError:
        return []
    best_metric = read_run_config(run_dir).train.best_metric if (run_dir / RUN_CONFIG_NAME).is_file() else "summary"
    lines = []
    if history.train:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in history.train[-1].get("losses", {}).items())
        lines.append(f"  last training log (step {history.train[-1]['step']}): {losses}")
    if history.validation:
        best = best_record(history.validation, best_metric)
        lines.append(
            f"  last validation (step {history.validation[-1]['step']}): {metrics_line(history.validation[-1])}"
        )
        if best:
            lines.append(f"  best validation {best_metric} (step {best['step']}): {metrics_line(best)}")
    if history.test:
        lines.append(f"  test (best checkpoint): {metrics_line(history.test)}")
    return [f"training run {run_dir}", *lines] if lines else []


# ----- entry point -----

COMMANDS = {"evaluate": Evaluate, "predict": Predict, "inspect": Inspect, "report": Report}


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
