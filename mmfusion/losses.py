"""Per-task losses with per-sample label masks.

A sample whose mask is False adds nothing to its task's loss; a batch with no labels for a task gives a zero loss
that is still connected to the graph (so every process in DDP sees the same parameters used), never NaN.
Dense tasks also leave out unlabelled pixels (segmentation: `ignore_index`; dense_regression: non-finite
targets) and average over the labelled pixels of the batch. Nothing here calls backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TaskSpec

POINTWISE_LOSSES = {"mse": F.mse_loss, "huber": F.huber_loss, "l1": F.l1_loss}
"""A regression's `TaskSpec.loss` -> its per-element loss; an unset loss (a spec built outside a run) is mse."""


def default_label_mask(spec: TaskSpec, labels: torch.Tensor) -> torch.Tensor:
    """Which samples carry a label when no mask is given: class >= 0, finite targets, positive matching pairs."""
    if spec.type == "classification":
        return labels >= 0
    if spec.type == "multilabel":
        return (labels >= 0).all(-1)
    if spec.type == "regression":
        return torch.isfinite(labels)
    if spec.type == "segmentation":
        return (labels != spec.ignore_index).flatten(1).any(1)
    if spec.type == "dense_regression":
        return torch.isfinite(labels).flatten(1).any(1)
    return labels > 0  # matching: 1 marks a true image-text pair


def _masked_mean(per_sample: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    weights = mask.to(per_sample.dtype) if weights is None else weights * mask.to(per_sample.dtype)
    return (per_sample * weights).sum() / weights.sum().clamp(min=1e-12)


def classification_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    targets = torch.where(mask, labels, torch.zeros_like(labels)).long()
    class_weights = None if spec.class_weights is None else logits.new_tensor(spec.class_weights)
    per_sample = F.cross_entropy(logits, targets, reduction="none", label_smoothing=spec.label_smoothing or 0.0)
    return _masked_mean(per_sample, mask, None if class_weights is None else class_weights[targets])


def multilabel_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    targets = torch.where(mask.unsqueeze(-1), labels, torch.zeros_like(labels)).to(logits.dtype)
    per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)
    return _masked_mean(per_sample, mask)


def regression_loss(spec: TaskSpec, predictions: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """The head predicts standardised targets; labels arrive in their own units."""
    standardised = (torch.where(mask, labels, torch.zeros_like(labels)) - spec.target_mean) / spec.target_std
    standardised = torch.where(mask, standardised, predictions.detach()).to(predictions.dtype)
    loss = POINTWISE_LOSSES[spec.loss or "mse"]
    return _masked_mean(loss(predictions, standardised, reduction="none"), mask)


def matching_loss(
    spec: TaskSpec,
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    memory_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
    negatives: str = "pairs",
):
    """Symmetric InfoNCE: each true pair ranks its partner among the batch's true pairs (negatives "pairs": other
    rows are neither queries nor candidates) or among every row's image and text ("rows").
    `memory_logits` ([B, M] images against remembered texts, texts against remembered images) add the true pairs
    of earlier batches as further candidates (train.matching_memory)."""
    logits = logits.float()
    if negatives == "pairs":
        hidden = ~(mask[None, :] & mask[:, None]) & ~torch.eye(len(mask), dtype=torch.bool, device=mask.device)
        logits = logits.masked_fill(hidden, torch.finfo(torch.float32).min)
    image_rows, text_rows = logits, logits.T
    if memory_logits is not None:
        image_rows = torch.cat([image_rows, memory_logits[0].float()], dim=1)
        text_rows = torch.cat([text_rows, memory_logits[1].float()], dim=1)
    targets = torch.arange(len(mask), device=logits.device)
    per_sample = F.cross_entropy(image_rows, targets, reduction="none") + F.cross_entropy(
        text_rows, targets, reduction="none"
    )
    return _masked_mean(per_sample / 2, mask)


def segmentation_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Per-pixel cross-entropy (class weights, label smoothing) over the labelled pixels of labelled samples, plus
    `dice_weight` times the soft Dice loss over the same pixels. logits [B, C, H, W], labels [B, H, W]."""
    logits = logits.float()
    valid = mask[:, None, None] & (labels != spec.ignore_index)
    targets = torch.where(valid, labels, torch.zeros_like(labels)).long()
    class_weights = None if spec.class_weights is None else logits.new_tensor(spec.class_weights)
    per_pixel = F.cross_entropy(logits, targets, reduction="none", label_smoothing=spec.label_smoothing or 0.0)
    loss = _masked_mean(per_pixel, valid, None if class_weights is None else class_weights[targets])
    if spec.dice_weight:
        loss = loss + spec.dice_weight * dice_loss(logits, targets, valid)
    return loss


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - the soft Dice coefficient of softmax(logits) against one-hot targets over each image's `valid` pixels,
    averaged over classes, then over the images with valid pixels (per image, so that the loss of a batch split
    among processes is the loss of the whole batch; `smooth` makes a class absent from both count as perfect)."""
    probabilities = logits.softmax(1) * valid[:, None]
    one_hot = F.one_hot(targets, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype) * valid[:, None]
    overlap = (probabilities * one_hot).sum((2, 3))
    total = probabilities.sum((2, 3)) + one_hot.sum((2, 3))
    per_image = 1 - ((2 * overlap + smooth) / (total + smooth)).mean(1)
    labelled = valid.flatten(1).any(1)
    return (per_image * labelled).sum() / labelled.sum().clamp(min=1)


SILOG_VARIANCE_FOCUS = 0.85
"""lambda of the scale-invariant log loss (Eigen et al. 2014): 1 ignores the global scale, 0 is a log-space MSE."""


def dense_regression_loss(spec: TaskSpec, predictions: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Over the valid pixels (finite targets) of labelled samples: L1, MSE or Huber of the standardised targets;
    or silog, the scale-invariant log loss per image (the head predicts log values), averaged over images.
    predictions and labels [B, H, W], labels in their own units."""
    predictions = predictions.float()
    valid = mask[:, None, None] & torch.isfinite(labels)
    if spec.loss == "silog":
        valid = valid & (labels > 0)
        difference = torch.where(valid, predictions - torch.log(labels.clamp(min=1e-12)), 0.0)
        pixels = valid.sum((1, 2)).clamp(min=1)
        mean, square = difference.sum((1, 2)) / pixels, (difference**2).sum((1, 2)) / pixels
        per_image = (square - SILOG_VARIANCE_FOCUS * mean**2).clamp(min=0) + 1e-8
        return _masked_mean(per_image.sqrt(), valid.flatten(1).any(1))
    standardised = (torch.where(valid, labels, spec.target_mean) - spec.target_mean) / spec.target_std
    loss = POINTWISE_LOSSES[spec.loss or "mse"]
    return _masked_mean(loss(predictions, standardised.to(predictions.dtype), reduction="none"), valid)


TASK_LOSSES = {
    "classification": classification_loss,
    "multilabel": multilabel_loss,
    "regression": regression_loss,
    "matching": matching_loss,
    "segmentation": segmentation_loss,
    "dense_regression": dense_regression_loss,
}


def task_loss(spec: TaskSpec, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return TASK_LOSSES[spec.type](spec, logits, labels, mask)
