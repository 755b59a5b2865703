"""Figures of a training run: training curves, validation metrics, confusion matrices, modality contributions,
fusion diagnostics (gate values, cross-attention maps) and the most confident errors.

Plain data in, a `matplotlib.figure.Figure` out. Figures are built without pyplot (the Agg canvas, no display
and no global figure state), so they are safe in scripts, tests and training processes; `save_png` writes one.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

from .metrics import LOWER_IS_BETTER

STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "figure.titlesize": 14,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
DPI = 100
MARKED_POINTS = 60  # lines with at most this many points also get a marker per point
BAR_FLOOR = -1.0  # modality bars (R² can be far below zero) are cut at this value
ANNOTATED_CLASSES = 20  # confusion matrices up to this size print their counts in the cells
METRIC_NAMES = {"count": "labelled rows", "r2": "R²", "mae": "MAE", "rmse": "RMSE", "map": "mAP", "auroc": "AUROC"}


@dataclass
class Mistake:
    """A wrongly classified validation row: its picture [H, W, 3] in [0, 1], text, labels and probability."""

    image: np.ndarray
    caption: str
    true: str
    predicted: str
    probability: float  # of the predicted (wrong) class
    row: int


@dataclass
class AttentionExample:
    """One image, its caption and, for each chosen word, its attention over the image patches [side, side]."""

    image: np.ndarray
    caption: str
    words: list[str]
    maps: list[np.ndarray]


def styled(build: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure with the report's font sizes and grid (rcParams apply when artists are created)."""

    @wraps(build)
    def wrapper(*args, **kwargs) -> Figure:
        with matplotlib.rc_context(STYLE):
            return build(*args, **kwargs)

    return wrapper


def save_png(figure: Figure, path: Path) -> Path:
    """Write `figure` as a PNG and return the path (figures use the constrained layout: nothing is cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, facecolor="white")
    return path


def task_colors(names: Sequence[str]) -> dict[str, str]:
    """One colour per task, the same in every figure."""
    palette = matplotlib.colormaps["tab10"]
    return {name: to_hex(palette(i % 10)) for i, name in enumerate(names)}


def metric_label(name: str) -> str:
    """Display name of a metric (R², MAE, macro_f1 ...)."""
    return METRIC_NAMES.get(name, name)


def _series(records: Sequence[dict], *keys: str) -> np.ndarray:
    """records[i][keys[0]][keys[1]]... as floats, NaN where a record lacks it."""
    values = []
    for record in records:
        value = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        values.append(float(value) if isinstance(value, (int, float)) else math.nan)
    return np.asarray(values, dtype=float)


def _line(ax: Axes, steps: Sequence[int], values: np.ndarray, **style) -> None:
    """A line over steps (whole-number ticks), with point markers when there are few points (so a single point
    stays visible)."""
    marker = "o" if len(steps) <= MARKED_POINTS else None
    ax.plot(steps, values, marker=marker, markersize=3.5, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_scale_if_wide(ax: Axes, values: np.ndarray) -> bool:
    """Log y axis when every value is positive and they span more than ~1.5 decades; returns whether it did."""
    finite = values[np.isfinite(values)]
    wide = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 30
    if wide:
        ax.set_yscale("log")
    return bool(wide)


def _mark_step(ax: Axes, step: int | None, label: str) -> None:
    if step is not None:
        ax.axvline(step, color="0.35", linestyle="--", linewidth=1.2, label=label)


# ----- training curves -----


@styled
def training_curves(records: Sequence[dict], colors: dict[str, str], weighting: str) -> Figure:
    """Four panels over optimizer steps: losses (total and per task), learning rate, loss weights, throughput."""
    steps = [record["step"] for record in records]
    tasks = [name for name in colors if any(name in record.get("losses", {}) for record in records)]
    figure = Figure(figsize=(13, 8.5), layout="constrained")
    (loss_ax, lr_ax), (weight_ax, speed_ax) = figure.subplots(2, 2, sharex=True)

    total = _series(records, "losses", "loss")
    _line(loss_ax, steps, total, color="black", linewidth=2.2, label="total (the optimised loss)")
    everything = [total]
    for task in tasks:
        values = _series(records, "losses", task)
        everything.append(values)
        _line(loss_ax, steps, values, color=colors[task], linewidth=1.4, label=task)
    log = _log_scale_if_wide(loss_ax, np.concatenate(everything))
    loss_ax.set(
        title="Training loss (mean over each logging interval)",
        ylabel="loss (nats; regression: MSE)" + (", log scale" if log else ""),
    )
    loss_ax.legend(ncols=2)

    _line(lr_ax, steps, _series(records, "lr"), color="tab:blue", linewidth=1.6, label="learning rate")
    lr_ax.set(title="Learning rate (fusion, heads, encoders trained from scratch)", ylabel="learning rate")
    lr_ax.yaxis.set_major_formatter(FormatStrFormatter("%.2e"))
    lr_ax.set_ylim(bottom=0)

    _weight_lines(weight_ax, steps, records, tasks, colors)
    weight_ax.set(
        title=f"Effective loss weight per task (loss_weighting: {weighting})",
        ylabel="weight (multiplies the task loss)",
        xlabel="optimizer step",
    )
    weight_ax.set_ylim(bottom=0)
    weight_ax.legend(ncols=2)

    _line(speed_ax, steps, _series(records, "pairs_per_s"), color="tab:green", linewidth=1.6, label="throughput")
    speed_ax.set(
        title="Training throughput (average since the start or resume)",
        ylabel="image-text pairs / s",
        xlabel="optimizer step",
    )
    speed_ax.set_ylim(bottom=0)
    figure.suptitle("Training curves")
    return figure


def _weight_lines(ax: Axes, steps: list[int], records: Sequence[dict], tasks: list[str], colors: dict) -> None:
    """Each task's loss weight over steps; one line for all when every task has the same weights (e.g. sum)."""
    series = {task: _series(records, "weights", task) for task in tasks}
    first = next(iter(series.values()), None)
    if first is not None and all(np.array_equal(first, values, equal_nan=True) for values in series.values()):
        _line(ax, steps, first, color="black", linewidth=1.6, label=f"all {len(tasks)} tasks (identical)")
        return
    for task, values in series.items():
        _line(ax, steps, values, color=colors[task], linewidth=1.4, label=task)


# ----- validation metrics -----


def metric_panels(records: Sequence[dict], tasks: Sequence[tuple[str, str]]) -> list[tuple[str, str, list[str], str]]:
    """(title, task, metrics, y label) of each validation panel: the summary, then per task its scores and,
    apart (they are in the target's units), its error metrics; per-class values (`iou/<label>`) are left out."""
    panels = [("summary (mean primary metric)", "", ["summary"], "mean primary metric")]
    for task, task_type in tasks:
        names = list(dict.fromkeys(k for r in records for k in r.get(task, {}) if k != "count" and "/" not in k))
        errors = [name for name in names if name in LOWER_IS_BETTER]
        scores = [name for name in names if name not in LOWER_IS_BETTER]
        if scores:
            unit = "R² (1 = perfect)" if scores == ["r2"] else "score (0-1, higher is better)"
            panels.append((f"{task} ({task_type})", task, scores, unit))
        if errors:
            panels.append((f"{task}: errors", task, errors, "error (target units, lower is better)"))
    return panels


@styled
def validation_curves(
    records: Sequence[dict], tasks: Sequence[tuple[str, str]], best_step: int | None, best_metric: str
) -> Figure:
    """Small multiples: each task's validation metrics over steps, the best step (by `best_metric`) marked."""
    steps = [record["step"] for record in records]
    panels = metric_panels(records, tasks)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, task, names, unit) in zip(axes, panels):
        for name in names:
            values = _series(records, task, name) if task else _series(records, name)
            _line(ax, steps, values, linewidth=1.6, label=metric_label(name))
        _mark_step(ax, best_step, f"best step {best_step}")
        ax.set(title=title, ylabel=unit, xlabel="optimizer step")
        ax.legend(loc="best")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.suptitle(f"Validation metrics over training (best step chosen by {best_metric})")
    return figure


# ----- confusion matrices -----


@styled
def confusion_matrix(task: str, labels: Sequence[str], matrix: Sequence[Sequence[int]], note: str) -> Figure:
    """Counts with rows = true label and columns = predicted label; colour = share of the true label's rows."""
    counts = np.asarray(matrix, dtype=int)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = len(labels)
    side = min(max(4.8, 0.65 * size + 2.8), 16)
    figure = Figure(figsize=(side + 1.4, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    rotate = max(len(label) for label in labels) > 4 or size > 8
    ax.set_xticks(range(size), labels, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticks(range(size), labels)
    ax.grid(False)
    if size <= ANNOTATED_CLASSES:
        for (row, column), count in np.ndenumerate(counts):
            color = "white" if shares[row, column] > 0.55 else "black"
            ax.text(
                column,
                row,
                f"{count}\n{shares[row, column]:.0%}",
                ha="center",
                va="center",
                color=color,
                fontsize=10 if size <= 8 else 8,
            )
    figure.colorbar(image, ax=ax, label="share of the true label's rows", shrink=0.85)
    ax.set(xlabel="predicted label", ylabel="true label", title=f"{task}: confusion matrix\n{note}")
    return figure


# ----- modality contributions -----


@styled
def modality_bars(table: dict[str, dict[str, float | None]], primary: dict[str, str], conditions: dict[str, str]):
    """Grouped bars: per task, its primary metric under each input condition (`conditions`: key -> label).
    Bars below BAR_FLOOR are cut there and hatched; every bar is labelled with its real value."""
    tasks = list(table)
    figure = Figure(figsize=(max(10.0, 1.9 * len(tasks) + 5), 4.8), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / len(conditions)
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#999999"]
    clipped, legend = False, []
    for i, (key, label) in enumerate(conditions.items()):
        values = np.array([math.nan if table[task][key] is None else table[task][key] for task in tasks], dtype=float)
        cut = values < BAR_FLOOR
        clipped |= bool(cut.any())
        offsets = np.arange(len(tasks)) + (i - (len(conditions) - 1) / 2) * width
        heights = np.nan_to_num(np.maximum(values, BAR_FLOOR), nan=0.0)
        color = palette[i % len(palette)]
        bars = ax.bar(offsets, heights, width, color=color)
        legend.append(Patch(color=color, label=label))
        for bar, is_cut in zip(bars, cut):
            bar.set_hatch("//" if is_cut else None)
        ax.bar_label(bars, labels=[_bar_text(value) for value in values], fontsize=8, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    title = "Modality contributions: each task's primary metric as inputs are removed"
    if clipped:
        ax.set_ylim(bottom=BAR_FLOOR - 0.15)
        title += f"\n(hatched bars are cut at {BAR_FLOOR:g}; their label is the real value)"
    ax.set_xticks(range(len(tasks)), [f"{task}\n({metric_label(primary[task])})" for task in tasks])
    ax.set(xlabel="task (primary metric)", ylabel="primary metric on the validation split", title=title)
    ax.grid(axis="x", visible=False)
    ax.legend(handles=legend, title="inputs", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _bar_text(value: float) -> str:
    """A bar's value label: 2 decimals, n/a when missing, never "-0.00"."""
    return "n/a" if math.isnan(value) else f"{value:.2f}".replace("-0.00", "0.00")


# ----- fusion diagnostics -----


@styled
def gate_histogram(gates: np.ndarray) -> Figure:
    """Gated fusion: the distribution of gate values g ([N, dim]; g weighs the image, 1 - g the text): all of
    them, each dimension's mean over the rows, and each row's mean over the dimensions."""
    figure = Figure(figsize=(16, 4.6), layout="constrained")
    all_ax, dim_ax, row_ax = figure.subplots(1, 3)
    unit_bins = np.linspace(0, 1, 41)
    panels = [
        (
            all_ax,
            gates.ravel(),
            unit_bins,
            "tab:purple",
            f"Every gate value ({gates.shape[0]} rows x {gates.shape[1]} dims)",
            "gate value g (1: image only, 0: text only)",
            "count of (row, dimension)",
        ),
        (
            dim_ax,
            gates.mean(0),
            unit_bins,
            "tab:orange",
            "Each fused dimension's mean gate",
            "mean gate value over the rows",
            "fused dimensions",
        ),
        (
            row_ax,
            gates.mean(1),
            30,
            "tab:cyan",
            "Each validation row's mean gate (x axis zoomed)",
            "mean gate value over the dimensions",
            "validation rows",
        ),
    ]
    for ax, values, bins, color, title, xlabel, ylabel in panels:
        ax.hist(values, bins=bins, color=color, alpha=0.85)
        ax.axvline(values.mean(), color="black", linestyle="--", label=f"mean {values.mean():.3f}")
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend()
    all_ax.set_xlim(0, 1)
    dim_ax.set_xlim(0, 1)
    figure.suptitle("Gated fusion: how much of each fused dimension comes from the image (g) or the text (1 - g)")
    return figure


@styled
def attention_maps(examples: Sequence[AttentionExample], layer_note: str) -> Figure:
    """Per example a row: the image, then each chosen word's attention over the image patches, overlaid."""
    columns = 1 + max(len(example.words) for example in examples)
    figure = Figure(figsize=(3.3 * columns + 1.0, 3.6 * len(examples)), layout="constrained")
    axes = figure.subplots(len(examples), columns, squeeze=False)
    for row_axes, example in zip(axes, examples):
        height, width = example.image.shape[:2]
        row_axes[0].imshow(example.image, interpolation="nearest")
        row_axes[0].set_xlabel(textwrap.fill(example.caption, 32), fontsize=9)
        row_axes[0].set_title("image")
        top = max((float(m.max()) for m in example.maps), default=1.0)
        overlay = None
        for ax, word, weights in zip(row_axes[1:], example.words, example.maps):
            ax.imshow(example.image, interpolation="nearest")
            overlay = ax.imshow(
                weights,
                cmap="jet",
                alpha=0.5,
                vmin=0,
                vmax=top,
                interpolation="bilinear",
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),
            )
            ax.set_title(f"“{word}”")
        for ax in row_axes:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
        for ax in row_axes[1 + len(example.words) :]:
            ax.set_visible(False)
        if overlay is not None:
            patches = example.maps[0].size
            figure.colorbar(
                overlay,
                ax=list(row_axes),
                shrink=0.8,
                label=f"attention weight (uniform: 1/{patches} = {1 / patches:.3f})",
            )
    figure.suptitle(f"Cross-attention: where caption words look in the image ({layer_note})")
    return figure


# ----- confident errors -----


@styled
def error_gallery(task: str, mistakes: Sequence[Mistake]) -> Figure:
    """The given wrongly classified rows: image, caption, true and predicted label with its probability."""
    columns = min(3, len(mistakes))
    rows = math.ceil(len(mistakes) / columns)
    title = f"{task}: the most confident errors on the validation split"
    figure = Figure(figsize=(max(4.0 * columns, 0.12 * len(title) + 0.5), 5.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, mistake in zip(axes, mistakes):
        ax.imshow(mistake.image, interpolation="nearest")
        ax.set_title(
            f"row {mistake.row}\ntrue: {mistake.true}\npredicted: {mistake.predicted} (p = {mistake.probability:.2f})",
            fontsize=10,
        )
        ax.set_xlabel(textwrap.fill(mistake.caption, 40), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    for ax in axes[len(mistakes) :]:
        ax.set_visible(False)
    figure.suptitle(title)
    return figure
