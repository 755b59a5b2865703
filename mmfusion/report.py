"""`mmfusion report RUN_DIR`: one self-contained HTML page about a training run.

    mmfusion report runs/mine                   # runs/mine/report.html, its figures also in runs/mine/report/
    mmfusion report runs/mine --data_path /data/mine --checkpoint final

The page shows the run's configuration and test metrics, the training curves and the validation metrics over
steps (as logged in metrics.jsonl; of the records a resume repeats for a step, the last), then, from the
checkpoint re-evaluated on the run's validation split: confusion matrices, the modality-contribution table, the
fusion's gate values or cross-attention maps, the most confident errors and, for dense tasks, true and predicted
maps with each class's IoU. Figures are embedded as data URIs;
the numbers are also embedded as JSON in `<script type="application/json" id="report-data">`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import viz
from .config import Config, TaskSpec
from .dense_report import dense_section
from .errors import InputError
from .html_page import esc, figure, note, number, render_page, section, table
from .reevaluation import MISTAKES_SHOWN, CheckpointResults, evaluate_checkpoint
from .runlog import History, best_record, describe_model, metric_value, read_history, read_run_config

CONDITION_NAMES = {
    "both": "image + text",
    "without_image": "text only (image removed)",
    "without_text": "image only (text removed)",
    "without_both": "neither (both removed)",
}
REPORT_NAME = "report.html"
FIGURE_DIR = "report"


# ----- the report -----


@dataclass
class ReportData:
    """Everything report.html shows; `as_json()` is what it embeds."""

    run_dir: Path
    config: Config
    history: History
    best: dict | None  # the validation record of the best step
    checkpoint: CheckpointResults | None
    checkpoint_note: str = ""  # why there are no checkpoint results

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.config.tasks

    def as_json(self) -> dict[str, Any]:
        """The logged records (deduplicated), the best step and the checkpoint's re-evaluated numbers."""
        return {
            "run_dir": str(self.run_dir),
            "best_metric": self.config.train.best_metric,
            "best_step": self.best["step"] if self.best else None,
            "train": self.history.train,
            "validation": self.history.validation,
            "test": self.history.test,
            "checkpoint": None if self.checkpoint is None else self.checkpoint.as_json(),
        }


def collect(
    run_dir: Path,
    checkpoint: str = "best",
    data_path: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    validation: torch.utils.data.Dataset | None = None,
) -> ReportData:
    """Read the run's files and re-evaluate its checkpoint (sections that need it are skipped, with the reason,
    when the checkpoint directory is not there)."""
    if not run_dir.is_dir():
        raise InputError(f"run directory not found: {run_dir}")
    history = read_history(run_dir)
    config = read_run_config(run_dir)
    best = best_record(history.validation, config.train.best_metric)
    data = ReportData(run_dir, config, history, best, None)
    directory = run_dir / checkpoint
    if not (directory / "config.json").is_file():
        data.checkpoint_note = f"There is no checkpoint in {directory}, so nothing was re-evaluated."
        return data
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data.checkpoint = evaluate_checkpoint(directory, config, data_path, batch_size, target, validation)
    return data


def write_report(run_dir: Path, **options) -> Path:
    """Write RUN_DIR/report.html (self-contained) and its figures as RUN_DIR/report/*.png; returns the page.
    `options` are `collect`'s: the checkpoint, the data's location, the batch size, the device, and `validation`,
    the run's validation split as training prepared it (so it is not read again)."""
    run_dir = Path(run_dir)
    data = collect(run_dir, **options)
    figure_dir = run_dir / FIGURE_DIR
    figure_dir.mkdir(exist_ok=True)
    for old in figure_dir.glob("*.png"):
        old.unlink()
    sections = [header(data), curves_section(data, figure_dir), validation_section(data, figure_dir)]
    sections += [confusion_section(data, figure_dir), modality_section(data, figure_dir)]
    sections += [fusion_section(data, figure_dir), mistakes_section(data, figure_dir)]
    if data.checkpoint is not None and any(spec.is_dense for spec in data.tasks):
        sections.append(dense_section(data.tasks, data.checkpoint, checkpoint_intro(data.checkpoint), figure_dir))
    page = run_dir / REPORT_NAME
    page.write_text(render_page(f"Training report: {run_dir.name}", sections, data.as_json()))
    return page


def metric_rows(records: list[dict | None], tasks: list[TaskSpec]) -> list[list[Any]]:
    """[task, metric, value per record] for every metric of every task, then the summary."""
    rows = []
    for spec in tasks:
        names = list(dict.fromkeys(k for r in records if r for k in r.get(spec.name, {})))
        rows += [
            [spec.name, viz.metric_label(n), *[(r or {}).get(spec.name, {}).get(n) for r in records]] for n in names
        ]
    rows.append(["summary", "mean primary metric", *[(r or {}).get("summary") for r in records]])
    return rows


def file_name(prefix: str, task: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.png"


def describe_run(config: Config) -> list[list[str]]:
    """Configuration rows of the header: the model's parts, the data and the optimisation."""
    train = config.train
    length = f"{train.max_steps} steps" if train.max_steps else f"{train.epochs:g} epochs"
    if train.time_limit:
        length = f"planned to {train.time_limit:g} s" + (
            f" (at most {train.max_steps} steps)" if train.max_steps else ""
        )
    return [
        *[[part, text] for part, text in describe_model(config.model_config())],
        ["data", config.data.path],
        [
            "training",
            f"{length}, batch size {train.batch_size} x {train.grad_accumulation} accumulation, lr "
            f"{train.lr:g} ({train.scheduler}, warmup {train.warmup_ratio:g}), loss weighting "
            f"{train.loss_weighting}, seed {train.seed}",
        ],
    ]


def header(data: ReportData) -> str:
    """Configuration summary, best step, validation metrics at the best and last steps, and test metrics."""
    history, best = data.history, data.best
    last_step = max((r["step"] for r in history.train + history.validation), default=None)
    rows = describe_run(data.config) + [["run directory", str(data.run_dir)], ["last logged step", last_step]]
    if best:
        metric = data.config.train.best_metric
        rows.append(["best step", f"{best['step']} ({metric} = {number(metric_value(best, metric))})"])
    body = table(["setting", "value"], rows, numeric_from=2)
    if history.validation:
        last = history.validation[-1]
        headers = [
            "task",
            "metric",
            f"best step ({best['step']})" if best else "best step",
            f"last step ({last['step']})",
        ]
        body += "<h3>Validation metrics (as logged in metrics.jsonl)</h3>" + table(
            headers, metric_rows([best, last], data.tasks), 2
        )
    if history.test:
        body += "<h3>Test metrics (best checkpoint, as logged)</h3>"
        body += table(["task", "metric", "test"], metric_rows([history.test], data.tasks), 2)
    else:
        body += note("The run has no test split, so there are no test metrics.")
    return section("Run", body)


def curves_section(data: ReportData, figure_dir: Path) -> str:
    """Losses, learning rate, loss weights and throughput over steps."""
    records = data.history.train
    if not records:
        return section("Training curves", note("metrics.jsonl has no training records yet."))
    colors = viz.task_colors([spec.name for spec in data.tasks])
    fig = viz.training_curves(records, colors, data.config.train.loss_weighting)
    caption = (
        f"{len(records)} training log records (every {data.config.train.log_every} steps). Task losses are "
        "the unweighted per-task losses; the total is what was optimised (the weighted combination)."
    )
    return section("Training curves", figure(fig, figure_dir / "training.png", "training curves", esc(caption)))


def validation_section(data: ReportData, figure_dir: Path) -> str:
    """Each task's validation metrics over steps, best step marked."""
    records = data.history.validation
    if not records:
        return section("Validation metrics", note("metrics.jsonl has no validation records yet."))
    best_step = data.best["step"] if data.best else None
    tasks = [(spec.name, spec.type) for spec in data.tasks]
    fig = viz.validation_curves(records, tasks, best_step, data.config.train.best_metric)
    caption = (
        f"{len(records)} evaluations of the validation split. The dashed line is the best step "
        f"({best_step}), whose weights are in best/."
    )
    return section("Validation metrics", figure(fig, figure_dir / "validation.png", "validation metrics", caption))


def checkpoint_intro(results: CheckpointResults) -> str:
    rows = f"{results.rows} validation rows" if results.rows >= 0 else "the validation stream"
    return f"Computed by re-evaluating {esc(results.directory)} on {rows}."


def classification_section(data: ReportData, title: str, missing: str, body: Callable[[CheckpointResults], str]):
    """A section about the classification tasks of the re-evaluated checkpoint, or a note saying why there is none."""
    if data.checkpoint is None:
        return section(title, note(data.checkpoint_note))
    if not data.checkpoint.confusion:
        return section(title, note(f"The run has no classification task, so there {missing}."))
    return section(title, body(data.checkpoint))


def confusion_section(data: ReportData, figure_dir: Path) -> str:
    """One confusion matrix per classification task (validation split, re-evaluated checkpoint)."""

    def matrices(results: CheckpointResults) -> str:
        body = f"<p>{checkpoint_intro(results)} Rows are the true label, columns the prediction.</p>"
        for task, matrix in results.confusion.items():
            labelled = sum(map(sum, matrix))
            note_text = f"validation split, {labelled} labelled rows"
            fig = viz.confusion_matrix(task, results.labels[task], matrix, note_text)
            body += figure(fig, figure_dir / file_name("confusion", task), f"{task} confusion matrix")
        return body

    return classification_section(data, "Confusion matrices (validation)", "is no confusion matrix", matrices)


def modality_section(data: ReportData, figure_dir: Path) -> str:
    """The primary metric of every task with both inputs, each removed, and both removed: table and bars."""
    title = "Modality contributions (validation)"
    results = data.checkpoint
    if results is None:
        return section(title, note(data.checkpoint_note))
    headers = ["task", "primary metric", *CONDITION_NAMES.values()]
    rows = [
        [task, viz.metric_label(results.primary[task]), *(values[c] for c in CONDITION_NAMES)]
        for task, values in results.modality.items()
    ]
    body = (
        f"<p>{checkpoint_intro(results)} A removed input is replaced by the model's learned placeholder. "
        "A task that drops when the image is removed relies on the image, and likewise for the text.</p>"
    )
    body += table(headers, rows, numeric_from=2)
    fig = viz.modality_bars(results.modality, results.primary, CONDITION_NAMES)
    return section(title, body + figure(fig, figure_dir / "modality.png", "modality contributions"))


def fusion_section(data: ReportData, figure_dir: Path) -> str:
    """Gated fusion: gate histogram; cross-attention: attention maps; other fusions: why there is nothing."""
    fusion = data.config.model.fusion
    title = f"Fusion diagnostics ({fusion})"
    results = data.checkpoint
    if results is None:
        return section(title, note(data.checkpoint_note))
    if results.gates is not None:
        fig = viz.gate_histogram(results.gates)
        caption = (
            "Each fused dimension is g·image + (1 − g)·text. Values near 1 take the image, near 0 the text; "
            "a mass at 0.5 means the gate mixes both evenly (or has not learned to choose)."
        )
        return section(
            title,
            f"<p>{checkpoint_intro(results)}</p>"
            + figure(fig, figure_dir / "gates.png", "gate histogram", esc(caption)),
        )
    if fusion == "cross_attention":
        if not results.attention:
            return section(title, note(f"No attention maps: {results.attention_note}."))
        fig = viz.attention_maps(results.attention, results.attention_note)
        caption = (
            "Each map is how strongly the word's token attends to each image patch; per image the colour "
            "scale is shared by its words. Words are the most sharply focused content words of the caption."
        )
        return section(
            title,
            f"<p>{checkpoint_intro(results)}</p>"
            + figure(fig, figure_dir / "attention.png", "attention maps", esc(caption)),
        )
    return section(
        title,
        note(
            f"The {fusion} fusion has no gate values or attention weights to show: this section "
            "is drawn for gated (gate histogram) and cross_attention (attention maps) runs."
        ),
    )


def mistakes_section(data: ReportData, figure_dir: Path) -> str:
    """Per classification task, the most confident errors: gallery and a table with the full captions."""

    def galleries(results: CheckpointResults) -> str:
        body = (
            f"<p>{checkpoint_intro(results)} Per classification task, the {MISTAKES_SHOWN} wrong predictions with "
            "the highest predicted probability.</p>"
        )
        for task, mistakes in results.mistakes.items():
            body += f"<h3>{esc(task)}</h3>"
            if not mistakes:
                body += note(f"No {task} errors on the validation split.")
                continue
            gallery = viz.error_gallery(task, mistakes)
            body += figure(gallery, figure_dir / file_name("errors", task), f"{task} errors")
            rows = [[m.row, m.caption, m.true, m.predicted, m.probability] for m in mistakes]
            body += table(["row", "caption", "true", "predicted", "probability"], rows, numeric_from=4)
        return body

    return classification_section(data, "Most confident errors (validation)", "are no errors to show", galleries)
