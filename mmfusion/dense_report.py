"""The run report's section on dense tasks: predicted against true masks on the first validation images, and each
segmentation class's IoU and pixel accuracy (the checkpoint re-evaluated on the validation split).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .config import TaskSpec
from .dense_metrics import class_names
from .html_page import esc, figure, section, table
from .masks import colourise
from .predictor import describe_maps
from .rows import model_inputs
from .viz import styled

MASK_EXAMPLES = 4
"""Validation images in the masks figure."""


@dataclass
class MaskExample:
    """One validation image as the model saw it ([S, S, 3] in [0, 1]), its text, and per dense task the true and
    the predicted map as colours ([H, W, 3] uint8; the true map None when the row has none)."""

    image: np.ndarray
    caption: str
    row: int
    true: dict[str, np.ndarray | None]
    predicted: dict[str, np.ndarray]


@torch.no_grad()
def mask_examples(model, rows) -> list[MaskExample]:
    """The first MASK_EXAMPLES validation rows (a `reevaluation.ValidationRows`) with their true and predicted maps."""
    tasks = [spec for spec in model.config.tasks if spec.is_dense]
    batch = next(rows.batches(batch_size=MASK_EXAMPLES))
    output = model(**model_inputs(batch))
    predicted = {spec.name: describe_maps(spec, output.logits[spec.name].float().cpu()) for spec in tasks}
    examples = []
    for i in range(len(batch["row"])):
        true, guess = {}, {}
        for spec in tasks:
            labelled = bool(batch["label_mask"][spec.name][i])
            true[spec.name] = colourise(spec, batch["labels"][spec.name][i].cpu().numpy()) if labelled else None
            result = predicted[spec.name][i]
            guess[spec.name] = colourise(spec, result["mask"] if spec.type == "segmentation" else result["values"])
        picture, caption = rows.picture(batch, i), rows.caption(batch, i)
        examples.append(MaskExample(picture, caption, int(batch["row"][i]), true, guess))
    return examples


@styled
def mask_figure(tasks: list[TaskSpec], examples: list[MaskExample]) -> Figure:
    """One row per example: the image, then each dense task's true and predicted map."""
    columns = 1 + 2 * len(tasks)
    figure = Figure(figsize=(2.6 * columns, 2.9 * len(examples) + 0.6), layout="constrained")
    axes = figure.subplots(len(examples), columns, squeeze=False)
    for ax_row, example in zip(axes, examples):
        panels = [(example.image, f"row {example.row}", textwrap.fill(example.caption, 30))]
        for spec in tasks:
            panels.append((example.true[spec.name], f"{spec.name}: true", ""))
            panels.append((example.predicted[spec.name], f"{spec.name}: predicted", ""))
        for ax, (picture, title, label) in zip(ax_row, panels):
            if picture is None:
                ax.text(0.5, 0.5, "no mask", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(label, fontsize=8)
            ax.set(xticks=[], yticks=[])
            ax.grid(False)
    figure.suptitle("Dense tasks on the first validation images: true and predicted maps")
    return figure


def class_rows(tasks: list[TaskSpec], metrics: dict[str, dict[str, float]]) -> list[list]:
    """[task, class, IoU, pixel accuracy] for each segmentation class, then the task's mean IoU and accuracy."""
    rows = []
    for spec in (spec for spec in tasks if spec.type == "segmentation" and metrics.get(spec.name, {}).get("count")):
        values = metrics[spec.name]
        rows += [[spec.name, name, values[f"iou/{name}"], values[f"accuracy/{name}"]] for name in class_names(spec)]
        rows.append([spec.name, "(mean IoU; all pixels)", values["miou"], values["pixel_accuracy"]])
    return rows


def dense_section(tasks: list[TaskSpec], results, intro: str, figure_dir: Path) -> str:
    """The section: the masks figure and the per-class table. `results` is the re-evaluated checkpoint
    (`reevaluation.CheckpointResults`)."""
    dense = [spec for spec in tasks if spec.is_dense]
    body = f"<p>{intro} Classes are coloured alike in every map; white pixels are unlabelled.</p>"
    body += figure(mask_figure(dense, results.masks), figure_dir / "masks.png", "true and predicted masks")
    rows = class_rows(dense, results.dense)
    if rows:
        body += "<h3>Per-class IoU and pixel accuracy</h3>"
        body += table(["task", "class", "IoU", "pixel accuracy"], rows, numeric_from=2)
    for spec in (spec for spec in dense if spec.type == "dense_regression"):
        values = results.dense.get(spec.name, {})
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "count")
        body += f"<p>{esc(spec.name)} (dense regression): {esc(shown or 'no labelled maps')}.</p>"
    return section("Dense tasks (validation)", body)
