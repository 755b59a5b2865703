"""Per-task evaluation metrics over a whole pass, the multi-task summary, and Δm (Maninis et al. 2019).

Each `TaskMetrics` keeps the labelled samples it is given (on CPU, float32) and computes its metrics with the
torchmetrics functional API on the concatenation at the end, so the result does not depend on how the pass was
batched. Nothing here syncs across processes: the training loop gathers outputs (accelerate's
`gather_for_metrics`, which also drops the duplicated samples of an uneven last batch) before `update`.

Metrics that are undefined on the data seen (R2 of fewer than two samples, AUROC with one class present, mAP
with no positive label) are 0.0, so a task's keys are the same in every evaluation and nothing is ever NaN;
a task with no labelled samples at all gives `{"count": 0}` and is left out of the summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error, pairwise_cosine_similarity, r2_score
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multilabel_average_precision,
    multilabel_f1_score,
)

from .config import TaskSpec
from .dense_metrics import DenseTaskMetrics
from .losses import default_label_mask

PRIMARY_METRIC: dict[str, tuple[str, bool]] = {
    "classification": ("macro_f1", True),
    "multilabel": ("map", True),
    "regression": ("r2", True),
    "matching": ("recall@1", True),
    "segmentation": ("miou", True),
    "dense_regression": ("r2", True),
}
"""Task type -> (the metric that stands for the task in `summary`, whether higher is better)."""

LOWER_IS_BETTER = {"mae", "rmse", "abs_rel"}
"""Metrics where a decrease is an improvement (sign-corrected in `delta_m`)."""

RECALL_KS = (1, 5)
"""The k of the matching task's recall@k."""

RETRIEVAL_CHUNK = 512
"""Queries scored at a time in retrieval, so memory stays O(chunk x N) rather than O(N^2)."""


def matching_outputs(image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
    """A matching task's per-sample metric input: both L2-normalised embeddings side by side, [B, 2E].

    The [B, B] logits cannot be gathered across processes or pooled across batches; the embeddings can
    (e.g. `model.heads[name].embed(image_pooled, text_pooled)`).
    """
    image = torch.nn.functional.normalize(image_embedding.float(), dim=-1)
    text = torch.nn.functional.normalize(text_embedding.float(), dim=-1)
    return torch.cat([image, text], dim=-1)


# ----- per task type: compute(spec, outputs, labels) -> metrics, on the labelled samples only -----


def _class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities, padded to two columns for a one-class task (torchmetrics needs >= 2 classes)."""
    probs = logits.double().softmax(-1)
    if probs.shape[-1] == 1:
        probs = torch.cat([probs, torch.zeros_like(probs)], dim=-1)
    return probs


def _classification(spec: TaskSpec, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro-F1 (classes absent from both targets and predictions are left out) and binary AUROC."""
    probs = _class_probabilities(logits)
    num_classes = probs.shape[-1]
    metrics = {
        "accuracy": multiclass_accuracy(probs, target, num_classes, average="micro").item(),
        "macro_f1": multiclass_f1_score(probs, target, num_classes, average="macro").item(),
    }
    if logits.shape[-1] == 2:
        both_present = target.unique().numel() == 2
        metrics["auroc"] = binary_auroc(probs[:, 1], target).item() if both_present else 0.0
    return metrics


def _mean_average_precision(probs: torch.Tensor, target: torch.Tensor) -> float:
    """Macro AP over the labels with at least one positive (AP is undefined, NaN in torchmetrics, for the rest)."""
    positive = target.sum(0) > 0
    if not positive.any():
        return 0.0
    probs, target = probs[:, positive], target[:, positive]
    if probs.shape[-1] == 1:
        return binary_average_precision(probs[:, 0], target[:, 0]).item()
    return multilabel_average_precision(probs, target, num_labels=probs.shape[-1], average="macro").item()


def _multilabel_f1(probs: torch.Tensor, target: torch.Tensor, average: str) -> float:
    """F1 at threshold 0.5; torchmetrics' multilabel API needs >= 2 labels, so one label is a binary F1."""
    if probs.shape[-1] == 1:
        return binary_f1_score(probs[:, 0], target[:, 0], threshold=0.5).item()
    return multilabel_f1_score(probs, target, num_labels=probs.shape[-1], threshold=0.5, average=average).item()


def _multilabel(spec: TaskSpec, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Micro and macro F1 of sigmoid(logits) > 0.5, and mAP (probabilities passed, never raw logits)."""
    probs = logits.double().sigmoid()
    return {
        "micro_f1": _multilabel_f1(probs, target, "micro"),
        "macro_f1": _multilabel_f1(probs, target, "macro"),
        "map": _mean_average_precision(probs, target),
    }


def _regression(spec: TaskSpec, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MAE, RMSE and R2 in the target's own units: the head predicts standardised values (float64 here)."""
    predictions = outputs.double() * spec.target_std + spec.target_mean
    target = target.double()
    return {
        "mae": mean_absolute_error(predictions, target).item(),
        "rmse": mean_squared_error(predictions, target, squared=False).item(),
        "r2": r2_score(predictions, target).item() if len(target) >= 2 else 0.0,
    }


def _recalls(queries: torch.Tensor, candidates: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k of retrieving candidate i for query i by cosine similarity: top-k accuracy with N classes."""
    n = len(queries)
    hits = dict.fromkeys(ks, 0)
    for start in range(0, n, RETRIEVAL_CHUNK):
        similarity = pairwise_cosine_similarity(queries[start : start + RETRIEVAL_CHUNK], candidates)
        truth = torch.arange(start, start + len(similarity))
        for k in ks:
            if k < n:
                accuracy = multiclass_accuracy(similarity, truth, n, top_k=k, average="micro", validate_args=False)
                hits[k] += round(accuracy.item() * len(similarity))
    return {k: 1.0 if k >= n else hits[k] / n for k in ks}  # k >= n candidates: every query is a hit


def _matching(spec: TaskSpec, outputs: torch.Tensor, target: torch.Tensor | None) -> dict[str, float]:
    """Image->text and text->image recall@k over all true pairs of the pass, and their mean per k."""
    image, text = outputs.double().chunk(2, dim=-1)
    directions = {"i2t": _recalls(image, text, RECALL_KS), "t2i": _recalls(text, image, RECALL_KS)}
    metrics = {f"recall@{k}_{name}": recalls[k] for name, recalls in directions.items() for k in RECALL_KS}
    for k in RECALL_KS:
        metrics[f"recall@{k}"] = (metrics[f"recall@{k}_i2t"] + metrics[f"recall@{k}_t2i"]) / 2
    return metrics


_COMPUTE: dict[str, Callable[[TaskSpec, torch.Tensor, torch.Tensor], dict[str, float]]] = {
    "classification": _classification,
    "multilabel": _multilabel,
    "regression": _regression,
    "matching": _matching,
}

_LABEL_DTYPE = {"classification": torch.long, "multilabel": torch.long, "regression": torch.float32}


class TaskMetrics:
    """One task's metrics over a whole evaluation pass; samples whose mask is False are ignored entirely.

    `update` inputs per task type: classification logits [B, C] with class indices [B]; multilabel logits
    [B, C] with multi-hot [B, C]; regression standardised predictions [B] with targets [B] in original units;
    matching `matching_outputs(image_embedding, text_embedding)` [B, 2E] (labels unused; mask = true pairs).
    """

    def __init__(self, spec: TaskSpec) -> None:
        if spec.type not in _COMPUTE:
            raise ValueError(f"task {spec.name!r}: unknown type {spec.type!r}; choose from {sorted(_COMPUTE)}")
        self.spec = spec
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen (start a new pass)."""
        self._outputs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    @property
    def count(self) -> int:
        """Labelled samples seen in this pass."""
        return sum(len(outputs) for outputs in self._outputs)

    def update(self, outputs: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor) -> None:
        """Keep the labelled samples of one batch, as CPU float32 (bf16 and GPU inputs welcome)."""
        keep = mask.detach().to("cpu", torch.bool).reshape(-1)
        outputs = outputs.detach().to("cpu", torch.float32)
        if self.spec.type == "regression":
            outputs = outputs.reshape(len(keep))
        if self.spec.type == "matching" and outputs.shape[-1] % 2:
            raise ValueError(f"task {self.spec.name!r}: matching outputs must be [B, 2E] image|text embeddings")
        self._outputs.append(outputs[keep])
        if self.spec.type != "matching":
            self._labels.append(labels.detach().cpu()[keep].to(_LABEL_DTYPE[self.spec.type]))

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        labels = torch.cat(self._labels) if self._labels else None
        return torch.cat(self._outputs), labels

    def compute(self) -> dict[str, float]:
        """The task's metrics, always with `count`; just `{"count": 0}` when no sample carried a label."""
        count = self.count
        if count == 0:
            return {"count": 0}
        outputs, labels = self._gathered()
        return {"count": count, **_COMPUTE[self.spec.type](self.spec, outputs, labels)}

    def confusion_matrix(self) -> list[list[int]] | None:
        """Classification only: counts with rows = true class, columns = predicted class (None otherwise)."""
        if self.spec.type != "classification":
            return None
        num_classes = self.spec.num_labels or (self._outputs[0].shape[-1] if self._outputs else 0)
        if self.count == 0:
            return [[0] * num_classes for _ in range(num_classes)]
        logits, target = self._gathered()
        probs = _class_probabilities(logits)
        matrix = multiclass_confusion_matrix(probs, target, probs.shape[-1])
        return matrix[:num_classes, :num_classes].tolist()


def task_metrics(spec: TaskSpec) -> TaskMetrics | DenseTaskMetrics:
    """The metrics of one task: dense tasks keep running sums (dense_metrics.py), the others their samples."""
    return DenseTaskMetrics(spec) if spec.is_dense else TaskMetrics(spec)


class MultiTaskMetrics:
    """`TaskMetrics` for every task, plus the summary (mean primary metric) in `compute()["summary"]`."""

    def __init__(self, specs: Sequence[TaskSpec]) -> None:
        self.specs = list(specs)
        if any(spec.name == "summary" for spec in self.specs):
            raise ValueError("a task cannot be named 'summary': that key holds the multi-task summary")
        self.tasks = {spec.name: task_metrics(spec) for spec in self.specs}

    def reset(self) -> None:
        for metrics in self.tasks.values():
            metrics.reset()

    def update(
        self,
        outputs: Mapping[str, torch.Tensor],
        labels: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
    ) -> None:
        """Update each task present in `outputs`; a missing mask is `default_label_mask` of the task's labels."""
        for spec in self.specs:
            if spec.name not in outputs:
                continue
            target, mask = labels.get(spec.name), masks.get(spec.name)
            if mask is None:
                if target is None:
                    continue
                mask = default_label_mask(spec, target)
            self.tasks[spec.name].update(outputs[spec.name], target, mask)

    def compute(self) -> dict:
        """`{task: {metric: value, "count": n}, ..., "summary": float}`."""
        results: dict = {name: metrics.compute() for name, metrics in self.tasks.items()}
        results["summary"] = summary(results, self.specs)
        return results

    def confusion_matrices(self) -> dict[str, list[list[int]]]:
        """Every classification task's confusion matrix (rows = true, columns = predicted)."""
        matrices = {name: metrics.confusion_matrix() for name, metrics in self.tasks.items()}
        return {name: matrix for name, matrix in matrices.items() if matrix is not None}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summary(metrics: Mapping[str, Mapping[str, float]], specs: Sequence[TaskSpec]) -> float:
    """Mean of each task's primary metric (negated where lower is better); unlabelled tasks are skipped."""
    values = []
    for spec in specs:
        task = metrics.get(spec.name)
        name, higher_is_better = PRIMARY_METRIC[spec.type]
        if isinstance(task, Mapping) and task.get("count", 0) and _is_number(task.get(name)):
            values.append(task[name] if higher_is_better else -task[name])
    return sum(values) / len(values) if values else 0.0


def _relative_changes(task: Mapping[str, float], baseline: Mapping[str, float]) -> list[float]:
    """(-1)^l_k (M_k - B_k) / |B_k| for each metric in both, skipping `count`, per-class values (`iou/<label>`)
    and zero baselines."""
    changes = []
    for name in sorted(set(task) & set(baseline) - {"count"}):
        if "/" in name:
            continue
        value, base = task[name], baseline[name]
        if _is_number(value) and _is_number(base) and base != 0:
            sign = -1.0 if name in LOWER_IS_BETTER else 1.0
            changes.append(sign * (value - base) / abs(base))
    return changes


def delta_m(
    metrics: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    specs: Sequence[TaskSpec],
) -> float:
    """Δm in percent: the mean over tasks of the mean sign-corrected relative change vs single-task baselines.

    Positive means the multi-task model is better on average. Tasks missing from either side, or with no
    comparable metric, are left out; with none left the result is 0.0.
    """
    per_task = []
    for spec in specs:
        task, baseline = metrics.get(spec.name), baselines.get(spec.name)
        if isinstance(task, Mapping) and isinstance(baseline, Mapping):
            changes = _relative_changes(task, baseline)
            if changes:
                per_task.append(sum(changes) / len(changes))
    return 100.0 * sum(per_task) / len(per_task) if per_task else 0.0
