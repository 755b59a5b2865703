"""Metrics: hand-computed values per task type, label masks, empty tasks, batching invariance, bf16, Δm."""

from __future__ import annotations

import math

import pytest
import torch

from mmfusion import metrics as metrics_module
from mmfusion.config import TaskSpec
from mmfusion.metrics import (
    MultiTaskMetrics,
    TaskMetrics,
    delta_m,
    matching_outputs,
    summary,
)

pytestmark = pytest.mark.filterwarnings("error")  # no warning spam from any metric

SPECS = {
    "classification": TaskSpec(name="topic", type="classification", num_labels=3),
    "binary": TaskSpec(name="spam", type="classification", num_labels=2),
    "multilabel": TaskSpec(name="tags", type="multilabel", num_labels=3),
    "regression": TaskSpec(name="score", type="regression", target_mean=10.0, target_std=2.0),
    "matching": TaskSpec(name="pair", type="matching"),
}


def compute(spec: TaskSpec, outputs: torch.Tensor, labels: torch.Tensor | None, mask=None) -> dict[str, float]:
    metrics = TaskMetrics(spec)
    metrics.update(outputs, labels, torch.ones(len(outputs), dtype=torch.bool) if mask is None else mask)
    return metrics.compute()


def assert_finite(results: dict) -> None:
    for value in results.values():
        if isinstance(value, dict):
            assert_finite(value)
        else:
            assert math.isfinite(value), results


def random_batch(kind: str, n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Outputs, labels and a mask with some samples unlabelled (their labels are the 'missing' sentinels)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, generator=g) > 0.25
    mask[:3] = True
    if kind in ("classification", "binary"):
        num_classes = SPECS[kind].num_labels
        labels = torch.randint(0, num_classes, (n,), generator=g)
        return torch.randn(n, num_classes, generator=g), torch.where(mask, labels, -1), mask
    if kind == "multilabel":
        labels = (torch.rand(n, 3, generator=g) > 0.5).float()
        return torch.randn(n, 3, generator=g), torch.where(mask[:, None], labels, -1.0), mask
    if kind == "regression":
        labels = 10 + 2 * torch.randn(n, generator=g)
        return torch.randn(n, generator=g), torch.where(mask, labels, float("nan")), mask
    image, text = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    return matching_outputs(image, image + text), mask.long(), mask


# ----- hand-computed values -----


def test_classification_accuracy_macro_f1_and_confusion_matrix():
    predicted, target = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 2, 2])
    metrics = TaskMetrics(SPECS["classification"])
    metrics.update(3.0 * torch.eye(3)[predicted], target, torch.ones(4, dtype=torch.bool))
    results = metrics.compute()
    # F1 per class: 1 (class 0), 2/3 (class 1: one false positive), 2/3 (class 2: one false negative).
    assert results == pytest.approx({"count": 4, "accuracy": 3 / 4, "macro_f1": 7 / 9})
    assert "auroc" not in results  # only binary tasks
    assert metrics.confusion_matrix() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]  # rows true, columns predicted


def test_classification_macro_f1_leaves_out_classes_never_seen_nor_predicted():
    predicted, target = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    results = compute(SPECS["classification"], torch.eye(3)[predicted], target)
    assert results["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


@pytest.mark.parametrize("target, expected", [([0, 0, 1, 1], 1.0), ([1, 1, 0, 0], 0.0), ([0, 1, 0, 1], 0.75)])
def test_binary_auroc_from_class_one_probability(target, expected):
    logits = torch.stack([torch.zeros(4), torch.tensor([-2.0, -1.0, 1.0, 2.0])], dim=-1)
    assert compute(SPECS["binary"], logits, torch.tensor(target))["auroc"] == pytest.approx(expected)


def test_binary_auroc_with_one_class_present_is_zero_not_nan():
    results = compute(SPECS["binary"], torch.randn(3, 2), torch.tensor([1, 1, 1]))
    assert results["auroc"] == 0.0


def test_multilabel_f1_and_map_skip_labels_never_positive():
    target = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    logits = torch.tensor([[2.0, -2, -2], [-3, 2, -2], [-1, 1, 2], [-2, -1, -2]])
    results = compute(SPECS["multilabel"], logits, target.float())
    # Thresholded: label 0 tp1 fn1 -> F1 2/3; label 1 tp2 -> 1; label 2 fp1 -> 0; micro tp3 fp1 fn1 -> 6/8.
    # AP: label 0 ranks its positives 1st and 4th -> 0.5 * 1 + 0.5 * 2/4 = 0.75; label 1 -> 1; label 2 skipped.
    assert results == pytest.approx({"count": 4, "micro_f1": 0.75, "macro_f1": 5 / 9, "map": 0.875})


def test_multilabel_without_any_positive_and_with_one_label():
    assert compute(SPECS["multilabel"], torch.randn(2, 3), torch.zeros(2, 3))["map"] == 0.0
    one = TaskSpec(name="flag", type="multilabel", num_labels=1)
    results = compute(one, torch.tensor([[1.0], [-1.0], [2.0]]), torch.tensor([[1.0], [1.0], [0.0]]))
    assert results == pytest.approx({"count": 3, "micro_f1": 0.5, "macro_f1": 0.5, "map": 0.5 * 1 / 2 + 0.5 * 2 / 3})


def test_regression_in_original_units():
    # target_mean 10, target_std 2: logits [-0.5, -0.5, 1.5, 1.5] are predictions [9, 9, 13, 13].
    target = torch.tensor([8.0, 10.0, 12.0, 14.0])  # mean 11, total sum of squares 20
    results = compute(SPECS["regression"], torch.tensor([-0.5, -0.5, 1.5, 1.5]), target)
    assert results == pytest.approx({"count": 4, "mae": 1.0, "rmse": 1.0, "r2": 1 - 4 / 20})


def test_regression_r2_is_finite_with_one_sample_or_constant_target():
    assert compute(SPECS["regression"], torch.tensor([0.5]), torch.tensor([10.0]))["r2"] == 0.0
    constant = compute(SPECS["regression"], torch.tensor([0.5, -0.5]), torch.tensor([10.0, 10.0]))
    assert constant == pytest.approx({"count": 2, "mae": 1.0, "rmse": 1.0, "r2": 0.0})


def test_matching_recall_at_one_per_direction():
    images = torch.eye(3)
    texts = torch.stack([torch.eye(3)[0], torch.tensor([2.0, 1.0, 0.0]), torch.eye(3)[2]])
    # Every image is closest to its own text, but text 1 is closer to image 0 (0.89) than to image 1 (0.45).
    results = compute(SPECS["matching"], matching_outputs(images, texts), None)
    assert results["recall@1_i2t"] == 1.0
    assert results["recall@1_t2i"] == pytest.approx(2 / 3)
    assert results["recall@1"] == pytest.approx(5 / 6)
    assert results["recall@5_i2t"] == results["recall@5_t2i"] == results["recall@5"] == 1.0  # 3 candidates


def test_matching_recall_at_one_with_a_known_permutation():
    permutation = torch.tensor([0, 1, 2, 4, 3, 5])  # text i describes image permutation[i]: pairs 3 and 4 swapped
    results = compute(SPECS["matching"], matching_outputs(torch.eye(6), torch.eye(6)[permutation]), None)
    assert results["recall@1_i2t"] == results["recall@1_t2i"] == pytest.approx(4 / 6)


@pytest.mark.parametrize("weights, recall_at_5", [([3, 7, 6, 5, 4, 2, 1], 1.0), ([2, 7, 6, 5, 4, 3, 1], 0.0)])
def test_matching_recall_at_five(weights, recall_at_5):
    # similarity(image i, text j) = weights[(j - i) % 7]: the true text ranks 5th (or 6th) for every query.
    offsets = (torch.arange(7)[:, None] - torch.arange(7)[None, :]) % 7  # [text j, dimension i]
    texts = torch.tensor(weights, dtype=torch.float32)[offsets]
    results = compute(SPECS["matching"], matching_outputs(torch.eye(7), texts), None)
    assert results["recall@1"] == 0.0
    assert results["recall@5_i2t"] == results["recall@5_t2i"] == results["recall@5"] == recall_at_5


def test_matching_scores_queries_in_chunks_without_changing_results(monkeypatch):
    outputs, labels, mask = random_batch("matching", n=40)
    expected = compute(SPECS["matching"], outputs, labels, mask)
    monkeypatch.setattr(metrics_module, "RETRIEVAL_CHUNK", 3)
    assert compute(SPECS["matching"], outputs, labels, mask) == expected


def test_matching_outputs_must_hold_two_halves():
    with pytest.raises(ValueError, match="2E"):
        TaskMetrics(SPECS["matching"]).update(torch.randn(2, 5), None, torch.ones(2, dtype=torch.bool))


# ----- masks, empty tasks, batching, dtypes -----


@pytest.mark.parametrize("kind", list(SPECS))
def test_masked_samples_are_ignored(kind):
    outputs, labels, mask = random_batch(kind)
    changed_outputs, changed_labels, _ = random_batch(kind, seed=1)
    changed_outputs = torch.where(mask.view(-1, *[1] * (outputs.dim() - 1)), outputs, changed_outputs)
    changed_labels = torch.where(mask.view(-1, *[1] * (labels.dim() - 1)), labels, changed_labels)
    expected = compute(SPECS[kind], outputs[mask], labels[mask])
    assert compute(SPECS[kind], outputs, labels, mask) == expected
    assert compute(SPECS[kind], changed_outputs, changed_labels, mask) == expected
    assert expected["count"] == int(mask.sum())


@pytest.mark.parametrize("kind", list(SPECS))
def test_one_batch_or_three_batches_give_identical_results(kind):
    outputs, labels, mask = random_batch(kind)
    batched = TaskMetrics(SPECS[kind])
    for part in (slice(0, 5), slice(5, 9), slice(9, None)):
        batched.update(outputs[part], labels[part], mask[part])
    single = compute(SPECS[kind], outputs, labels, mask)
    assert batched.compute() == single
    assert_finite(single)


@pytest.mark.parametrize("kind", list(SPECS))
def test_bf16_outputs_match_their_float32_values(kind):
    outputs, labels, mask = random_batch(kind)
    outputs = outputs.bfloat16()
    assert compute(SPECS[kind], outputs, labels, mask) == compute(SPECS[kind], outputs.float(), labels, mask)


@pytest.mark.parametrize("kind", list(SPECS))
def test_task_without_labels_gives_count_zero(kind):
    outputs, labels, _ = random_batch(kind)
    metrics = TaskMetrics(SPECS[kind])
    assert metrics.compute() == {"count": 0}  # never updated
    metrics.update(outputs, labels, torch.zeros(len(outputs), dtype=torch.bool))
    assert metrics.compute() == {"count": 0}


def test_confusion_matrix_only_for_classification_and_zero_when_empty():
    assert TaskMetrics(SPECS["regression"]).confusion_matrix() is None
    assert TaskMetrics(SPECS["binary"]).confusion_matrix() == [[0, 0], [0, 0]]


def test_multitask_leaves_an_unlabelled_task_out_of_the_summary():
    specs = [SPECS["classification"], SPECS["regression"], SPECS["multilabel"]]
    metrics = MultiTaskMetrics(specs)
    predicted = torch.tensor([0, 1, 2, 1, 0])
    metrics.update(
        {"topic": torch.eye(3)[predicted], "score": torch.randn(5), "tags": torch.randn(5, 3)},
        {"topic": torch.tensor([0, 1, 2, 2, -1]), "score": torch.full((5,), float("nan"))},  # no tags labels
        {"score": torch.zeros(5, dtype=torch.bool)},  # topic falls back to default_label_mask (-1 = missing)
    )
    results = metrics.compute()
    assert results["score"] == {"count": 0}
    assert results["tags"] == {"count": 0}
    assert results["topic"]["count"] == 4
    assert results["topic"]["macro_f1"] == pytest.approx(7 / 9)
    assert results["summary"] == results["topic"]["macro_f1"]
    assert metrics.confusion_matrices() == {"topic": [[1, 0, 0], [0, 1, 0], [0, 1, 1]]}
    assert_finite(results)
    metrics.reset()
    assert metrics.compute() == {"topic": {"count": 0}, "score": {"count": 0}, "tags": {"count": 0}, "summary": 0.0}


def test_multitask_rejects_a_task_named_summary():
    with pytest.raises(ValueError, match="summary"):
        MultiTaskMetrics([TaskSpec(name="summary", type="regression")])


# ----- summary and delta_m -----


def test_summary_is_the_mean_of_each_task_types_primary_metric():
    specs = [
        TaskSpec("c", num_labels=2),
        TaskSpec("m", "multilabel", num_labels=2),
        TaskSpec("r", "regression"),
        TaskSpec("p", "matching"),
        TaskSpec("unlabelled", num_labels=2),
    ]
    metrics = {
        "c": {"count": 3, "accuracy": 0.1, "macro_f1": 0.2, "auroc": 0.3},
        "m": {"count": 3, "micro_f1": 0.4, "macro_f1": 0.5, "map": 0.6},
        "r": {"count": 3, "mae": 0.7, "rmse": 0.8, "r2": 0.9},
        "p": {"count": 3, "recall@1": 0.25, "recall@5": 0.5},
        "unlabelled": {"count": 0},
    }
    assert summary(metrics, specs) == pytest.approx((0.2 + 0.6 + 0.9 + 0.25) / 4)
    better_mae = {**metrics, "r": {**metrics["r"], "mae": 0.35}}  # lower is better: a gain, in delta_m's sign
    assert delta_m(better_mae, metrics, specs[2:3]) == pytest.approx(100 * 0.5 / 3)


def test_summary_is_the_mean_primary_metric_of_labelled_tasks():
    specs = [SPECS["classification"], SPECS["regression"], SPECS["matching"]]
    metrics = {
        "topic": {"count": 4, "accuracy": 0.9, "macro_f1": 0.6},
        "score": {"count": 4, "mae": 3.0, "r2": 0.2},
        "pair": {"count": 0},
    }
    assert summary(metrics, specs) == pytest.approx(0.4)
    assert summary({}, []) == 0.0
    assert MultiTaskMetrics([]).compute() == {"summary": 0.0}


def test_delta_m_corrects_the_sign_of_lower_is_better_metrics():
    specs = [SPECS["regression"]]
    better_rmse = {"score": {"count": 5, "rmse": 0.9}}
    assert delta_m(better_rmse, {"score": {"count": 7, "rmse": 1.0}}, specs) == pytest.approx(10.0)
    assert delta_m({"score": {"r2": 0.45}}, {"score": {"r2": 0.5}}, specs) == pytest.approx(-10.0)


def test_delta_m_averages_metrics_within_then_across_tasks():
    specs = [SPECS["regression"], SPECS["classification"], SPECS["matching"]]
    metrics = {
        "score": {"count": 10, "mae": 0.8, "rmse": 1.0, "r2": 0.5},
        "topic": {"count": 10, "accuracy": 0.9, "macro_f1": 0.3},
        "pair": {"count": 10, "recall@1": 0.5},
        "summary": 0.5,
    }
    baselines = {
        "score": {"count": 99, "mae": 1.0, "rmse": 1.0, "r2": 0.4},  # count is never compared
        "topic": {"count": 99, "accuracy": 1.0, "macro_f1": 0.0},  # a zero baseline is skipped
    }  # no baseline for "pair": left out
    # score: mean(+0.2, 0, +0.25) = 0.15; topic: -0.1 -> mean 0.025 -> 2.5 %
    assert delta_m(metrics, baselines, specs) == pytest.approx(2.5)
    assert delta_m(metrics, {}, specs) == 0.0
