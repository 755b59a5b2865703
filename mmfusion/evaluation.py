"""One evaluation pass: model outputs gathered across processes (no duplicates at an uneven end), then metrics."""

from __future__ import annotations

import torch

from .config import TaskSpec
from .data import model_inputs
from .metrics import MultiTaskMetrics
from .model import FusionOutput

MODALITY_ABLATIONS = ("image", "text")


def metric_inputs(spec: TaskSpec, output: FusionOutput) -> torch.Tensor:
    """What a task's metric reads per sample: logits, or the matching embeddings (retrieval over the whole set)."""
    if spec.type == "matching":
        return output.extras["matching_embeddings"][spec.name]
    return output.logits[spec.name]


@torch.no_grad()
def evaluate(
    model,
    loader,
    accelerator,
    tasks: list[TaskSpec],
    remove: str | None = None,
    metrics: MultiTaskMetrics | None = None,
) -> dict:
    """Metrics of every task over `loader`; `remove="image"|"text"` evaluates with that modality absent.
    Pass `metrics` to read more from it afterwards (confusion matrices)."""
    was_training = model.training
    model.eval()
    metrics = metrics or MultiTaskMetrics(tasks)
    for batch in loader:
        inputs = model_inputs(batch, remove)
        with accelerator.autocast():
            output = model(**inputs)
        outputs = {spec.name: metric_inputs(spec, output).float() for spec in tasks}
        outputs, labels, masks = accelerator.gather_for_metrics((outputs, batch["labels"], batch["label_mask"]))
        metrics.update(outputs, labels, masks)
    model.train(was_training)
    return metrics.compute()


def modality_contributions(model, loader, accelerator, tasks: list[TaskSpec]) -> dict:
    """Each task's metrics with both modalities, with the image removed and with the text removed."""
    table = {"both": evaluate(model, loader, accelerator, tasks)}
    for modality in MODALITY_ABLATIONS:
        table[f"without_{modality}"] = evaluate(model, loader, accelerator, tasks, remove=modality)
    return table
