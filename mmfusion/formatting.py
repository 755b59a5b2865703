"""How the `mmfusion` commands show things as text: metrics and confusion matrices, the modality-contribution
table, a prediction, a checkpoint's parts and tasks, and the run that wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .config import FusionConfig, TaskSpec
from .errors import InputError
from .metrics import PRIMARY_METRIC
from .predictor import label_names
from .runlog import RUN_CONFIG_NAME, best_record, describe_model, metrics_line, read_history, read_run_config

if TYPE_CHECKING:
    from .model import FusionModel
    from .processing import FusionProcessor
    from .rows import SkipReport

SHOWN_SCORES = 10  # classes listed per task in a human-readable prediction


def format_contributions(table: dict[str, dict], tasks: list[TaskSpec]) -> str:
    """Each task's primary metric with both modalities, without the image and without the text."""
    lines = [f"{'task (primary metric)':<32}" + "".join(f"{name:>16}" for name in table)]
    for spec in tasks:
        metric = PRIMARY_METRIC[spec.type][0]
        values = [table[name].get(spec.name, {}).get(metric) for name in table]
        cells = "".join(f"{v:>16.4f}" if v is not None else f"{'-':>16}" for v in values)
        lines.append(f"{f'{spec.name} ({metric})':<32}{cells}")
    return "\n".join(lines)


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
