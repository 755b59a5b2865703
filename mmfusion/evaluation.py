"""The one evaluation pass: a model over a loader, under one or more modality conditions (both inputs, without the
image, without the text, without both), outputs gathered across processes (no duplicates at an uneven end), then
each task's metrics. Training, `mmfusion evaluate`, the Python API and the report all call `evaluate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .config import DataConfig, TaskSpec
from .metrics import MultiTaskMetrics
from .model import FusionOutput
from .prepare import load_split
from .processing import ProcessorSettings
from .rows import SkipReport, loader_workers, make_loader, model_inputs

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
    device = next(model.parameters(), torch.empty(0)).device  # an exported (onnxruntime) model has none: CPU
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


@dataclass
class Evaluation:
    """A checkpoint on one split: metrics, confusion matrices, the other conditions' metrics, the skipped rows."""

    metrics: dict  # with both modalities
    confusion_matrices: dict[str, list[list[int]]]
    conditions: dict[str, dict]  # the other conditions asked for, e.g. without_image
    report: SkipReport
    main_process: bool = True


def evaluate_checkpoint(
    model,
    processor,
    data: DataConfig,
    split: str,
    batch_size: int = 64,
    conditions: tuple[str, ...] = ("both",),
    source: Any = None,
    cpu: bool = False,
) -> Evaluation:
    """What `mmfusion evaluate`, `Predictor.evaluate` and `mmfusion.evaluate` compute: the checked rows of `split`
    of `source` (default: data.path; or anything `load_splits` takes), evaluated under `conditions`; `cpu` keeps
    accelerate off the GPU."""
    from accelerate import Accelerator

    tasks = model.config.tasks
    dataset, report = load_split(data, split, processor, tasks, source)
    accelerator = Accelerator(cpu=cpu)
    workers = loader_workers(data, accelerator)
    loader = make_loader(dataset, batch_size, processor.settings.pad_id, False, workers)
    model, loader = accelerator.prepare(model, loader)
    results = evaluate(model, loader, accelerator, tasks, ("both", *[c for c in conditions if c != "both"]))
    metrics = {condition: result.compute() for condition, result in results.items()}
    both = metrics.pop("both")
    return Evaluation(both, results["both"].confusion_matrices(), metrics, report, accelerator.is_main_process)


def checkpoint_data_config(data: DataConfig, settings: ProcessorSettings, given: frozenset[str]) -> DataConfig:
    """The data options as the checkpoint was trained with them (its column names, image root and missing-modality
    policy, from processor.json), except those in `given` (options named on the command line)."""
    remembered = {
        name: getattr(settings, name)
        for name in ("image_column", "text_column", "image_root", "missing_modality")
        if f"--data.{name}" not in given
    }
    return dataclasses.replace(data, **remembered)
