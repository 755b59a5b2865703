"""Per-task losses with per-sample label masks.

A sample whose mask is False adds nothing to its task's loss; a batch with no labels for a task gives a zero loss
that is still connected to the graph (so every process in DDP sees the same parameters used), never NaN.
Nothing here calls backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TaskSpec


def default_label_mask(spec: TaskSpec, labels: torch.Tensor) -> torch.Tensor:
    """Which samples carry a label when no mask is given: class >= 0, finite targets, positive matching pairs."""
    if spec.type == "classification":
        return labels >= 0
    if spec.type == "multilabel":
        return (labels >= 0).all(-1)
    if spec.type == "regression":
        return torch.isfinite(labels)
    return labels > 0  # matching: 1 marks a true image-text pair


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    weights = mask.to(per_sample.dtype) if weights is None else weights * mask.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1e-12)


def classification_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    targets = torch.where(mask, labels, torch.zeros_like(labels)).long()
    class_weights = None if spec.class_weights is None else logits.new_tensor(spec.class_weights)
    per_sample = F.cross_entropy(logits, targets, reduction="none", label_smoothing=spec.label_smoothing)
    return _masked_mean(per_sample, mask, None if class_weights is None else class_weights[targets])


def multilabel_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    targets = torch.where(mask.unsqueeze(-1), labels, torch.zeros_like(labels)).to(logits.dtype)
    per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)
    return _masked_mean(per_sample, mask)


def regression_loss(spec: TaskSpec, predictions: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """The head predicts standardised targets; labels arrive in their own units."""
    standardised = (torch.where(mask, labels, torch.zeros_like(labels)) - spec.target_mean) / spec.target_std
    standardised = torch.where(mask, standardised, predictions.detach()).to(predictions.dtype)
    loss = F.mse_loss if spec.loss == "mse" else F.huber_loss
    return _masked_mean(loss(predictions, standardised, reduction="none"), mask)


def matching_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Symmetric InfoNCE over the true pairs in the batch; other rows are neither queries nor candidates."""
    hidden = ~(mask[None, :] & mask[:, None]) & ~torch.eye(len(mask), dtype=torch.bool, device=mask.device)
    logits = logits.float().masked_fill(hidden, torch.finfo(torch.float32).min)
    targets = torch.arange(len(mask), device=logits.device)
    per_sample = F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(
        logits.T, targets, reduction="none"
    )
    return _masked_mean(per_sample / 2, mask)


TASK_LOSSES = {
    "classification": classification_loss,
    "multilabel": multilabel_loss,
    "regression": regression_loss,
    "matching": matching_loss,
}


def task_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return TASK_LOSSES[spec.type](spec, logits, labels, mask)
