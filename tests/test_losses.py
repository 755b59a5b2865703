"""Masked per-task losses: missing labels add nothing, an unlabelled batch gives zero (never NaN)."""

from __future__ import annotations

import re

import pytest
import torch

from mmfusion import TaskSpec
from mmfusion.heads import MatchingHead
from mmfusion.losses import default_label_mask, matching_loss, task_loss

SPECS = {
    "classification": TaskSpec("c", "classification", num_labels=3),
    "multilabel": TaskSpec("m", "multilabel", num_labels=4),
    "regression": TaskSpec("r", "regression", target_mean=1.0, target_std=2.0),
    "matching": TaskSpec("p", "matching"),
}


def _example(kind: str):
    torch.manual_seed(0)
    if kind == "classification":
        return torch.randn(4, 3, requires_grad=True), torch.tensor([0, 2, 1, 1])
    if kind == "multilabel":
        return torch.randn(4, 4, requires_grad=True), torch.tensor(
            [[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]]
        )
    if kind == "regression":
        return torch.randn(4, requires_grad=True), torch.tensor([0.5, 3.0, -1.0, 2.0])
    return torch.randn(4, 4, requires_grad=True), torch.ones(4, dtype=torch.long)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_masked_sample_adds_nothing(kind):
    spec = SPECS[kind]
    logits, labels = _example(kind)
    mask = torch.tensor([True, True, False, True])
    loss = task_loss(spec, logits, labels, mask)
    loss.backward()
    if kind == "matching":  # the hidden row is neither a query nor a candidate
        assert torch.all(logits.grad[2] == 0) and torch.all(logits.grad[:, 2] == 0)
    else:
        assert torch.all(logits.grad[2] == 0)
    # Changing the masked sample's label changes nothing.
    other = labels.clone()
    other[2] = 1 - other[2] if kind != "regression" else 1e6
    assert torch.equal(task_loss(spec, logits, other, mask), loss)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_unlabelled_batch_gives_zero_loss_with_zero_gradient(kind):
    spec = SPECS[kind]
    logits, labels = _example(kind)
    loss = task_loss(spec, logits, labels, torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)


def test_loss_values_match_reference_formulas():
    logits, labels = _example("classification")
    mask = torch.tensor([True, False, True, True])
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    torch.testing.assert_close(task_loss(SPECS["classification"], logits, labels, mask), expected)

    predictions, targets = _example("regression")
    standardised = (targets - 1.0) / 2.0
    expected = ((predictions - standardised)[mask] ** 2).mean()
    torch.testing.assert_close(task_loss(SPECS["regression"], predictions, targets, mask), expected)
    absolute = TaskSpec("r", "regression", target_mean=1.0, target_std=2.0, loss="l1")
    expected = (predictions - standardised)[mask].abs().mean()
    torch.testing.assert_close(task_loss(absolute, predictions, targets, mask), expected)

    smoothed = TaskSpec("c", "classification", num_labels=3, label_smoothing=0.2)
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[mask], label_smoothing=0.2)
    torch.testing.assert_close(task_loss(smoothed, logits, labels, mask), expected)

    weighted = TaskSpec("c", "classification", num_labels=3, class_weights=[1.0, 2.0, 3.0])
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[mask], weight=torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(task_loss(weighted, logits, labels, mask), expected)


def test_matching_loss_prefers_aligned_pairs():
    aligned = torch.eye(4) * 10
    shuffled = aligned[[1, 0, 3, 2]]
    mask, labels = torch.ones(4, dtype=torch.bool), torch.ones(4)
    assert task_loss(SPECS["matching"], aligned, labels, mask) < 0.01
    assert task_loss(SPECS["matching"], shuffled, labels, mask) > 5


def test_remembered_pairs_are_further_candidates_of_both_directions():
    """With memory logits the loss is InfoNCE over the batch's and the remembered pairs together, each batch row
    ranking its partner among all of them (rows and columns of the whole similarity matrix)."""
    torch.manual_seed(0)
    head = MatchingHead(6, 5, 8)
    head.memory_size = 3
    image, text = head.embed(torch.randn(7, 6), torch.randn(7, 5))  # rows 0-3 the batch, 4-6 remembered
    head.remember(image[4:], text[4:], torch.ones(3, dtype=torch.bool))
    batch, mask = slice(0, 4), torch.ones(4, dtype=torch.bool)
    loss = matching_loss(
        SPECS["matching"],
        head.similarity(image[batch], text[batch]),
        torch.ones(4),
        mask,
        head.memory_logits(image[batch], text[batch]),
    )
    whole = head.similarity(image, text)
    targets = torch.arange(4)
    f = torch.nn.functional
    expected = (f.cross_entropy(whole[:4], targets) + f.cross_entropy(whole.T[:4], targets)) / 2
    torch.testing.assert_close(loss, expected)
    alone = task_loss(SPECS["matching"], head.similarity(image[batch], text[batch]), torch.ones(4), mask)
    assert alone < loss  # more candidates, a harder ranking


def test_rows_that_are_no_true_pair_can_be_negatives_but_not_queries():
    torch.manual_seed(0)
    logits, mask = torch.randn(4, 4) * 3, torch.tensor([True, False, True, True])
    loss = matching_loss(SPECS["matching"], logits, torch.tensor([1, 0, 1, 1]), mask, negatives="rows")
    f, rows = torch.nn.functional, torch.tensor([0, 2, 3])
    expected = (f.cross_entropy(logits[rows], rows) + f.cross_entropy(logits.T[rows], rows)) / 2
    torch.testing.assert_close(loss, expected)
    pairs = torch.tensor([0, 2, 3])[:, None], torch.tensor([0, 2, 3])  # row 1 hidden both ways
    only_pairs = (
        f.cross_entropy(logits[pairs], torch.arange(3)) + f.cross_entropy(logits.T[pairs], torch.arange(3))
    ) / 2
    torch.testing.assert_close(matching_loss(SPECS["matching"], logits, torch.tensor([1, 0, 1, 1]), mask), only_pairs)


def test_a_head_remembers_its_newest_true_pairs_without_gradient():
    head = MatchingHead(2, 2, 2)
    image = torch.arange(8.0, requires_grad=True).reshape(4, 2)
    text = -image
    assert head.memory_logits(image, text) is None
    head.remember(image, text, torch.ones(4, dtype=torch.bool))
    assert head.memory is None  # memory_size 0: nothing kept
    head.memory_size = 3
    head.remember(image[:2], text[:2], torch.tensor([True, True]))
    head.remember(image[2:], text[2:], torch.tensor([False, True]))  # row 2 is no true pair
    assert head.memory.tolist() == [[6, 7, -6, -7], [0, 1, 0, -1], [2, 3, -2, -3]]
    assert not head.memory.requires_grad
    head.remember(image[2:], text[2:], torch.tensor([True, True]))
    assert head.memory[:, 0].tolist() == [4, 6, 6]


def test_default_masks():
    assert default_label_mask(SPECS["classification"], torch.tensor([0, -1, 2])).tolist() == [True, False, True]
    assert default_label_mask(SPECS["regression"], torch.tensor([0.0, float("nan")])).tolist() == [True, False]
    assert default_label_mask(SPECS["multilabel"], torch.tensor([[0, 1], [-1, -1]])).tolist() == [True, False]
    assert default_label_mask(SPECS["matching"], torch.tensor([1, 0])).tolist() == [True, False]


def test_label_smoothing_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match=re.escape("task 'c': label_smoothing must be in [0, 1), got 1.5")):
        TaskSpec("c", "classification", num_labels=3, label_smoothing=1.5)
