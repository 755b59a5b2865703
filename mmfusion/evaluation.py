"""The one evaluation pass: a model over a loader, under one or more modality conditions (both inputs, without the
image, without the text, without both), outputs gathered across processes (no duplicates at an uneven end), then
each task's metrics. Training, `mmfusion evaluate`, the Python API and the report all call `evaluate`.
"""

from __future__ import annotations

import contextlib

import torch

from .config import TaskSpec
from .metrics import MultiTaskMetrics
from .model import FusionOutput
from .rows import model_inputs

CONDITIONS: dict[str, tuple[str, ...]] = {
    "both": (),
    "without_image": ("image",),
    "without_text": ("text",),
    "without_both": ("image", "text"),
}
"""Condition name -> the modalities removed (replaced by the model's learned placeholders)."""

MODALITY_CONDITIONS = ("both", "without_image", "without_text")
"""The modality-contribution table of `mmfusion evaluate --modalities`."""


def metric_inputs(spec: TaskSpec, output: FusionOutput) -> torch.Tensor:
    """What a task's metric reads per sample: logits, or the matching embeddings (retrieval over the whole set)."""
    if spec.type == "matching":
        return output.extras["matching_embeddings"][spec.name]
    return output.logits[spec.name]


@torch.no_grad()
def evaluate(
    model, loader, accelerator, tasks: list[TaskSpec], conditions: tuple[str, ...] = ("both",)
) -> dict[str, MultiTaskMetrics]:
    """Each condition's metrics over one pass of `loader` (the model runs once per condition and batch); read them
    with `.compute()` and `.confusion_matrices()`. With `accelerator=None` this process evaluates alone: no
    gathering, no autocast, batches moved to the model's device."""
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown evaluation conditions {unknown}; choose from {list(CONDITIONS)}")
    was_training = model.training
    model.eval()
    results = {condition: MultiTaskMetrics(tasks) for condition in conditions}
    device = next(model.parameters()).device
    for batch in loader:
        if accelerator is None:
            batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
        for condition, metrics in results.items():
            with accelerator.autocast() if accelerator else contextlib.nullcontext():
                output = model(**model_inputs(batch, CONDITIONS[condition]))
            outputs = {spec.name: metric_inputs(spec, output).float() for spec in tasks}
            found = (outputs, batch["labels"], batch["label_mask"])
            metrics.update(*(accelerator.gather_for_metrics(found) if accelerator else found))
    model.train(was_training)
    return results
