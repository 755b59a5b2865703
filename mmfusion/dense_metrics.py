"""Metrics of dense tasks over a whole pass, kept as running sums (torchmetrics states) rather than every map.

segmentation: mean IoU over the classes present in the targets or the predictions (dataset-level intersections
and unions, `ignore_index` pixels left out), pixel accuracy, and per class `iou/<label>` and `accuracy/<label>`
(a class absent from both is 0). torchmetrics' `segmentation.MeanIoU` averages per-image IoUs and has no
ignore_index, so the multiclass Jaccard index (its confusion matrix summed over the pass) is used instead.
dense_regression: RMSE, MAE, abs-rel (mean |prediction - target| / |target| over pixels with a non-zero
target) and R2, in the target's units, over the valid pixels (finite targets).

Like metrics.TaskMetrics: `update(outputs, labels, mask)` takes a batch (outputs already gathered across
processes), samples whose mask is False are left out, and `compute()` gives `{"count": labelled images, ...}`.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanAbsoluteError, MeanAbsolutePercentageError, MeanSquaredError, MetricCollection, R2Score
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from .config import TaskSpec


def class_names(spec: TaskSpec) -> list[str]:
    return list(spec.labels) if spec.labels else [str(i) for i in range(spec.num_labels)]


def segmentation_predictions(logits: torch.Tensor) -> torch.Tensor:
    """What segmentation metrics read per sample: the predicted class of each pixel [B, H, W] (C times less to
    gather across processes than the logits)."""
    return logits.argmax(1)


class DenseTaskMetrics:
    """One dense task's metrics over an evaluation pass. `update` inputs: segmentation predicted classes [B, H, W]
    (`segmentation_predictions`) with class ids [B, H, W]; dense_regression the head's outputs [B, H, W]
    (standardised, or log values with the silog loss) with targets [B, H, W] in their units (NaN: unlabelled)."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        if spec.type == "segmentation":
            options = {"num_classes": spec.num_labels, "ignore_index": spec.ignore_index, "validate_args": False}
            metrics = {
                "miou": MulticlassJaccardIndex(average="macro", **options),
                "class_iou": MulticlassJaccardIndex(average="none", **options),
                "pixel_accuracy": MulticlassAccuracy(average="micro", **options),
                "class_accuracy": MulticlassAccuracy(average="none", **options),
            }
        else:
            metrics = {"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError(), "r2": R2Score()}
            self.abs_rel = MeanAbsolutePercentageError()
        self.metrics = MetricCollection(metrics, compute_groups=True)
        self.reset()

    def reset(self) -> None:
        self.metrics.reset()
        if self.spec.type == "dense_regression":
            self.abs_rel.reset()
        self.count = 0
        self.pixels = 0

    def update(self, outputs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        keep = mask.detach().to("cpu", torch.bool).reshape(-1)
        outputs, labels = outputs.detach().cpu()[keep], labels.detach().cpu()[keep]
        self.count += int(keep.sum())
        if self.spec.type == "segmentation":
            self.pixels += int((labels != self.spec.ignore_index).sum())
            if len(labels):
                self.metrics.update(outputs.long().flatten(), labels.long().flatten())
            return
        valid = torch.isfinite(labels)
        predictions, targets = self.values(outputs.double())[valid], labels.double()[valid]
        self.pixels += len(targets)
        if len(targets):
            self.metrics.update(predictions, targets)
        nonzero = targets != 0
        if nonzero.any():
            self.abs_rel.update(predictions[nonzero], targets[nonzero])

    def values(self, outputs: torch.Tensor) -> torch.Tensor:
        """dense_regression outputs in the target's units."""
        if self.spec.loss == "silog":
            return outputs.exp()
        return outputs * self.spec.target_std + self.spec.target_mean

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return {"count": 0}
        if self.pixels == 0:
            return {"count": self.count, **self._empty()}
        computed = self.metrics.compute()
        if self.spec.type == "dense_regression":
            return {
                "count": self.count,
                "rmse": computed["rmse"].item(),
                "mae": computed["mae"].item(),
                "abs_rel": self.abs_rel.compute().item() if self.abs_rel.update_count else 0.0,
                "r2": computed["r2"].item() if self.pixels >= 2 else 0.0,
            }
        names = class_names(self.spec)
        metrics = {"count": self.count, "miou": computed["miou"].item()}
        metrics["pixel_accuracy"] = computed["pixel_accuracy"].item()
        metrics.update({f"iou/{name}": value for name, value in zip(names, computed["class_iou"].tolist())})
        metrics.update({f"accuracy/{name}": value for name, value in zip(names, computed["class_accuracy"].tolist())})
        return metrics

    def _empty(self) -> dict[str, float]:
        """Labelled images without a labelled pixel: every metric 0 (the same keys as always)."""
        if self.spec.type == "dense_regression":
            return dict.fromkeys(("rmse", "mae", "abs_rel", "r2"), 0.0)
        names = class_names(self.spec)
        return {
            "miou": 0.0,
            "pixel_accuracy": 0.0,
            **{f"{kind}/{n}": 0.0 for kind in ("iou", "accuracy") for n in names},
        }

    def confusion_matrix(self) -> None:
        return None
