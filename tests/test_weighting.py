"""Loss weighting strategies on toy problems with known answers, absent tasks, and train.py integration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_batch, tiny_config

from mmfusion import FusionModel, TaskSpec
from mmfusion.config import TrainConfig
from mmfusion.training import build_optimizer, regression_share
from mmfusion.weighting import WEIGHTINGS, build_weighting

TASKS = [TaskSpec("a", "regression"), TaskSpec("b", "regression")]
ONE_PROCESS = SimpleNamespace(num_processes=1, scaler=None, reduce=lambda x, op: x)
BOTH = torch.tensor([True, True])


def _conflicting_linear_tasks():
    """Shared parameter w in R^2; L_a = g_a . w and L_b = g_b . w, so their gradients are g_a and g_b."""
    w = torch.zeros(2, requires_grad=True)
    g_a, g_b = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0])  # conflicting: g_a . g_b < 0
    return w, g_a, g_b, {"a": g_a @ w, "b": g_b @ w}


def _combined_gradient(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w, g_a, g_b, losses = _conflicting_linear_tasks()
    weighting = build_weighting(name, TASKS)
    weighting.space = "parameters"
    weighting.observe(losses, BOTH, [w], ONE_PROCESS)
    weighting(losses, BOTH, step=0).backward()
    return w.grad, g_a, g_b


def test_pcgrad_removes_the_conflicting_component():
    combined, g_a, g_b = _combined_gradient("pcgrad")
    projected_a = g_a - (g_a @ g_b) / (g_b @ g_b) * g_b
    projected_b = g_b - (g_a @ g_b) / (g_a @ g_a) * g_a
    torch.testing.assert_close(combined, projected_a + projected_b)
    assert combined @ g_a >= 0 and combined @ g_b >= 0  # no task is pushed uphill
    assert (g_a + g_b) @ g_a < combined @ g_a  # plain summing would have hurt task a more


def test_mgda_finds_the_min_norm_combination():
    combined, g_a, g_b = _combined_gradient("mgda")
    alpha = ((g_b - g_a) @ g_b) / ((g_a - g_b) @ (g_a - g_b))  # closed form for two tasks
    expected = 2 * (alpha * g_a + (1 - alpha) * g_b)  # MGDA weights are scaled to sum to the task count
    torch.testing.assert_close(combined, expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(combined @ g_a, combined @ g_b, atol=1e-3, rtol=1e-3)  # equal descent for both


def test_cagrad_improves_the_worst_task_over_plain_averaging():
    combined, g_a, g_b = _combined_gradient("cagrad")
    mean = (g_a + g_b) / 2
    assert min(combined @ g_a, combined @ g_b) / combined.norm() > min(mean @ g_a, mean @ g_b) / mean.norm()


def test_nll_is_the_joint_likelihood_with_each_regression_noise_at_its_maximum():
    tasks = [
        TaskSpec("c", "classification"),
        TaskSpec("m", "multilabel", num_labels=4),
        TaskSpec("r", "regression"),
        TaskSpec("l", "regression", loss="l1"),
    ]
    weighting = build_weighting("nll", tasks)
    z = torch.tensor([0.3, 0.4, 0.2, 0.5], requires_grad=True)
    losses = {"c": z[0].exp(), "m": z[1].exp(), "r": z[2] ** 2, "l": z[3].abs()}
    weighting(losses, torch.tensor([True, True, True, True]), step=0).backward()
    torch.testing.assert_close(weighting.weights, torch.tensor([1.0, 4.0, 0.5 / 0.2**2, 1.0 / 0.5]))
    # the gradient of cross-entropy + 4 x the mean binary cross-entropy of 4 labels + 0.5 log MSE + log L1
    w = z.detach().clone().requires_grad_(True)
    (w[0].exp() + 4 * w[1].exp() + 0.5 * torch.log(w[2] ** 2) + torch.log(w[3].abs())).backward()
    torch.testing.assert_close(z.grad, w.grad)
    assert not list(weighting.parameters()) and not weighting.stateful  # nothing learned: FSDP can train with it


def test_nll_noise_decay_weighs_each_regression_by_a_running_mean_of_its_loss(tmp_path):
    tasks = [TaskSpec("c", "classification"), TaskSpec("r", "regression"), TaskSpec("l", "regression", loss="l1")]
    weighting = build_weighting("nll", tasks, nll_noise_decay=0.9)
    steps = [([2.0, 0.5, 4.0], [True, True, True]), ([1.0, 0.1, 9.0], [True, True, False])]
    for values, present in steps:
        losses, present = dict(zip("crl", map(torch.tensor, values))), torch.tensor(present)
        weighting.observe_losses(losses, present, ONE_PROCESS)
        weighting(losses, present, step=0)
    noise_r = 0.9 * 0.5 + 0.1 * 0.1  # the second step's own loss (0.1) would give 0.5 / 0.1
    torch.testing.assert_close(weighting.weights, torch.tensor([1.0, 0.5 / noise_r, 0.0]))  # l: absent, weight 0
    torch.testing.assert_close(weighting.noise, torch.tensor([0.9 * 2.0 + 0.1 * 1.0, noise_r, 4.0]))  # l kept
    weighting.save(tmp_path)
    restored = build_weighting("nll", tasks, nll_noise_decay=0.9)
    restored.load(tmp_path)  # a resume continues the running means
    assert torch.equal(restored.noise, weighting.noise) and weighting.stateful


THREE_TYPES = [TaskSpec("c", "classification"), TaskSpec("m", "multilabel", num_labels=4), TaskSpec("r", "regression")]
ALL_THREE = torch.tensor([True, True, True])


def fit_weights(weighting, losses, present, steps=500):
    """Train only the weighting's parameters on fixed task losses, so its weights settle where it sends them."""
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        weighting(losses, present, step=0).backward()
        optimizer.step()


def test_uncertainty_weights_move_toward_inverse_loss_of_each_task():
    weighting = build_weighting("uncertainty", TASKS)
    losses = {"a": torch.tensor(0.05), "b": torch.tensor(2.0)}  # b is the noisier task
    fit_weights(weighting, losses, BOTH)
    torch.testing.assert_close(weighting.weights, torch.tensor([1 / 0.05, 1 / 2.0]), rtol=0.05, atol=0.0)


def test_uncertainty_can_start_each_weight_at_its_tasks_number_of_outcomes():
    losses = {"c": torch.tensor(2.0), "m": torch.tensor(0.5), "r": torch.tensor(0.2)}
    weighting = build_weighting("uncertainty", THREE_TYPES, uncertainty_start="outcomes")
    weighting(losses, ALL_THREE, step=0)
    torch.testing.assert_close(weighting.weights, torch.tensor([1.0, 4.0, 1.0]))  # the mean of 4 labels counts 4
    ones = build_weighting("uncertainty", THREE_TYPES)
    ones(losses, ALL_THREE, step=0)
    torch.testing.assert_close(ones.weights, torch.tensor([1.0, 1.0, 1.0]))
    fit_weights(weighting, losses, ALL_THREE)  # the start changes where the weights begin, not where they go
    torch.testing.assert_close(weighting.weights, torch.tensor([1 / 2.0, 1 / 0.5, 1 / 0.2]), rtol=0.05, atol=0.0)


def test_uncertainty_max_weight_bounds_classification_weights_and_leaves_regressions_free():
    losses = {"c": torch.tensor(0.01), "m": torch.tensor(0.5), "r": torch.tensor(0.01)}  # c fitted; m not yet
    weighting = build_weighting("uncertainty", THREE_TYPES, uncertainty_max_weight=4.0)
    fit_weights(weighting, losses, ALL_THREE)
    torch.testing.assert_close(weighting.weights, torch.tensor([4.0, 1 / 0.5, 1 / 0.01]), rtol=0.05, atol=0.0)
    stuck = weighting.log_variance.detach().clone()  # at the bound the weight gets no gradient: it stays put
    weighting.zero_grad()
    weighting(losses, ALL_THREE, step=0).backward()
    assert weighting.log_variance.grad[0] == 0.0 and weighting.log_variance.grad[2] != 0.0
    fit_weights(weighting, losses, ALL_THREE, steps=1)
    assert weighting.log_variance[0] == stuck[0]


def test_uncertainty_regression_max_weight_bounds_regressions_alone():
    losses = {"c": torch.tensor(0.01), "m": torch.tensor(0.5), "r": torch.tensor(0.01)}
    weighting = build_weighting("uncertainty", THREE_TYPES, uncertainty_regression_max_weight=3.0)
    fit_weights(weighting, losses, ALL_THREE)
    torch.testing.assert_close(weighting.weights, torch.tensor([1 / 0.01, 1 / 0.5, 3.0]), rtol=0.05, atol=0.0)


@pytest.mark.parametrize("name", ["sum", "uncertainty", "gradnorm"])
def test_a_regression_share_scales_only_the_regressions_gradient_into_the_model(name):
    """At share s the model gets s of each regression's gradient and all of the classifications'; the loss's value
    and a learned weight's gradient are what they are at share 1."""
    w = torch.ones(3, requires_grad=True)
    losses = {"c": 2 * w[0], "m": 3 * w[1], "r": 5 * w[2]}

    def combine(share):
        weighting = build_weighting(name, THREE_TYPES)
        weighting.regression_share = share
        if weighting.needs_gradients:
            weighting.space = "parameters"
            weighting.observe(losses, ALL_THREE, [w], ONE_PROCESS)
        w.grad = None
        loss = weighting(losses, ALL_THREE, step=0)
        loss.backward(retain_graph=True)
        learned = [p.grad.clone() for p in weighting.parameters()]
        return loss.detach(), w.grad.clone(), weighting.weights, learned

    whole, quarter = combine(1.0), combine(0.25)
    torch.testing.assert_close(quarter[0], whole[0])
    torch.testing.assert_close(quarter[1], whole[1] * torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(quarter[2], whole[2] * torch.tensor([1.0, 1.0, 0.25]))  # logged: what the model got
    for learned_quarter, learned_whole in zip(quarter[3], whole[3]):
        torch.testing.assert_close(learned_quarter, learned_whole)


def test_the_regression_share_rises_linearly_over_the_warmup():
    assert [regression_share(0.5, step, 100) for step in (0, 25, 50, 80)] == [0.0, 0.5, 1.0, 1.0]
    assert regression_share(0.0, 0, 100) == 1.0


def test_the_default_training_config_holds_classification_weights_at_half_their_outcome_counts():
    """The suite's choice (benchmarks/results/recipes_weight_bound_outcomes.md): uncertainty with each weight
    starting at its task's number of outcomes and each classification and multilabel weight bounded at half of it, so
    a fitted cross-entropy does not take the shared encoders from a regression."""
    config = TrainConfig()
    losses = {"c": torch.tensor(0.01), "m": torch.tensor(0.1), "r": torch.tensor(0.01)}  # all fitted: weights rise
    weighting = build_weighting(
        config.loss_weighting,
        THREE_TYPES,
        uncertainty_start=config.uncertainty_start,
        uncertainty_max_weight=config.uncertainty_max_weight,
    )
    fit_weights(weighting, losses, ALL_THREE)
    torch.testing.assert_close(weighting.weights, torch.tensor([0.5, 4 * 0.5, 1 / 0.01]), rtol=0.05, atol=0.0)


def test_uncertainty_max_weight_is_a_multiple_of_each_start():
    """Under `uncertainty_start outcomes` a multilabel task starts at its number of labels: its bound is that many
    times the bound of a classification, so a bound of 1 lets every weight fall from its start and none rise."""
    losses = {"c": torch.tensor(0.01), "m": torch.tensor(0.01), "r": torch.tensor(0.01)}  # all fitted: weights rise
    weighting = build_weighting("uncertainty", THREE_TYPES, uncertainty_start="outcomes", uncertainty_max_weight=1.0)
    fit_weights(weighting, losses, ALL_THREE)
    torch.testing.assert_close(weighting.weights, torch.tensor([1.0, 4.0, 1 / 0.01]), rtol=0.05, atol=0.0)


@pytest.mark.parametrize("weighting_lr,expected_step", [(0.0, 1e-3), (0.05, 0.05)])
def test_the_learned_weights_train_at_weighting_lr_and_the_model_at_lr(weighting_lr, expected_step):
    torch.manual_seed(0)
    model = FusionModel(tiny_config())
    weighting = build_weighting("uncertainty", model.config.tasks)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weighting_lr=weighting_lr), weighting.parameters())
    before = [p.detach().clone() for p in (*model.parameters(), weighting.log_variance)]
    out = model(**tiny_batch())
    present = torch.ones(len(weighting.names), dtype=torch.bool)
    weighting(out.task_losses, present, step=0).backward()
    optimizer.step()  # Adam's first step moves every parameter with a gradient by about its learning rate
    after = [p.detach() for p in (*model.parameters(), weighting.log_variance)]
    model_step = max(float((a - b).abs().max()) for a, b in zip(after[:-1], before[:-1]))
    assert model_step == pytest.approx(1e-3, rel=0.1)  # plus weight decay
    torch.testing.assert_close(
        (after[-1] - before[-1]).abs(), torch.full_like(after[-1], expected_step), rtol=1e-3, atol=0
    )


def test_dwa_raises_the_weight_of_the_slower_task():
    weighting = build_weighting("dwa", TASKS)
    for epoch_losses in ([1.0, 1.0], [0.5, 0.9]):  # a improves fast, b slowly
        weighting({"a": torch.tensor(epoch_losses[0]), "b": torch.tensor(epoch_losses[1])}, BOTH, step=0)
        weighting.end_epoch(ONE_PROCESS)
    weighting({"a": torch.tensor(0.4), "b": torch.tensor(0.8)}, BOTH, step=0)
    ratios = torch.tensor([0.5, 0.9])
    torch.testing.assert_close(weighting.weights, 2 * torch.softmax(ratios / 2.0, dim=0))
    assert weighting.weights[1] > weighting.weights[0]


def test_rlw_draws_depend_only_on_seed_and_step():
    weighting = build_weighting("rlw", TASKS, seed=3)
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}
    weighting(losses, BOTH, step=7)
    first = weighting.weights.clone()
    weighting(losses, BOTH, step=8)
    assert not torch.equal(first, weighting.weights)
    weighting(losses, BOTH, step=7)
    assert torch.equal(first, weighting.weights) and torch.isclose(first.sum(), torch.tensor(2.0))


def test_gls_is_the_geometric_mean():
    weighting = build_weighting("gls", TASKS)
    total = weighting({"a": torch.tensor(4.0), "b": torch.tensor(1.0)}, BOTH, step=0)
    torch.testing.assert_close(total, torch.tensor(2.0))
    torch.testing.assert_close(weighting.weights, torch.tensor([2.0 / (2 * 4.0), 2.0 / (2 * 1.0)]))


def test_gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient():
    weighting = build_weighting("gradnorm", TASKS)
    z = torch.ones(3, requires_grad=True)
    for _ in range(5):
        losses = {"a": (10 * z).sum(), "b": z.sum()}  # equal training rates, a's gradient is 10x larger
        weighting.observe(losses, BOTH, [z], ONE_PROCESS)
    assert weighting.current[0] < 1.0 < weighting.current[1]
    torch.testing.assert_close(weighting.current.sum(), torch.tensor(2.0))


def test_gradnorm_alpha_decides_whether_a_task_that_learned_faster_loses_weight():
    """Equal gradient norms; task a's loss falls 10x faster than b's. With alpha 1.5 GradNorm moves weight to b
    (the slower task); with alpha 0 the weighted norms are already equal, so the weights stay 1."""
    z = torch.ones(3, requires_grad=True)
    weights = {}
    for alpha in (1.5, 0.0):
        weighting = build_weighting("gradnorm", TASKS, gradnorm_alpha=alpha)
        for step in range(8):  # both gradients are ones(3); the loss values follow their own schedules
            losses = {"a": z.sum() - 3 + 3 * 10 ** (-step / 4), "b": z.sum() - 3 + 3 * 10 ** (-step / 40)}
            weighting.observe(losses, BOTH, [z], ONE_PROCESS)
        weights[alpha] = weighting.current
    assert weights[1.5][0] < 0.9 and weights[1.5][1] > 1.1
    torch.testing.assert_close(weights[0.0], torch.ones(2))


def test_gradnorm_min_weight_keeps_a_task_whose_loss_falls_fastest_in_play():
    """Task a's loss falls 100x faster than b's, as a squared error does beside a cross-entropy: at the default
    minimum its weight falls to the clamp; at 0.25 it stays near 0.25 (clamped there, then rescaled with b's so
    that the two sum to 2)."""
    z = torch.ones(3, requires_grad=True)
    weights = {}
    for min_weight in (1e-3, 0.25):
        weighting = build_weighting("gradnorm", TASKS, gradnorm_min_weight=min_weight)
        for step in range(80):
            losses = {"a": z.sum() - 3 + 3 * 10 ** (-step / 4), "b": z.sum() - 3 + 3 * 10 ** (-step / 400)}
            weighting.observe(losses, BOTH, [z], ONE_PROCESS)
        weights[min_weight] = weighting.current
        torch.testing.assert_close(weights[min_weight].sum(), torch.tensor(2.0))
    assert weights[1e-3][0] < 0.01
    assert 0.2 < weights[0.25][0] < 0.3


def test_gradnorm_with_an_absent_task_updates_the_present_ones_as_if_alone():
    three = [TaskSpec("a", "regression"), TaskSpec("b", "regression"), TaskSpec("c", "regression")]
    with_absent, alone = build_weighting("gradnorm", three), build_weighting("gradnorm", [three[0], three[2]])
    z = torch.ones(3, requires_grad=True)
    for step in range(6):
        a, c = (10 * z).sum() / (step + 1), (z**2).sum()  # a learns fast with a large gradient
        with_absent.observe({"a": a, "b": (z * 0).sum(), "c": c}, torch.tensor([True, False, True]), [z], ONE_PROCESS)
        alone.observe({"a": a, "c": c}, BOTH, [z], ONE_PROCESS)
        torch.testing.assert_close(with_absent.current[[0, 2]], alone.current)
        assert with_absent.current[1] == 0 and with_absent.learned[1] == 1 and with_absent.initial_loss[1] == 0
    assert not torch.allclose(alone.current, torch.ones(2))  # the weights did move


def test_gradnorm_never_reads_a_device_value_on_the_host():
    """On the meta device every host read (.item(), bool(), nonzero) raises: GradNorm's step has none, so on GPU
    it queues without waiting, fp16 loss scale included; PCGrad's solver does read (the check can fail)."""
    z = torch.ones(3, device="meta", requires_grad=True)
    present = torch.tensor([True, False], device="meta")

    def losses():
        return {"a": (z**2).sum(), "b": (z * 0).sum()}

    def host_read():
        raise AssertionError("the fp16 loss scale was read on the host")

    scaler = SimpleNamespace(_get_scale_async=lambda: torch.tensor(1024.0, device="meta"), get_scale=host_read)
    fp16 = SimpleNamespace(**{**vars(ONE_PROCESS), "scaler": scaler})
    for accelerator in (ONE_PROCESS, fp16):
        build_weighting("gradnorm", TASKS).to("meta").observe(losses(), present, [z], accelerator)
    with pytest.raises(NotImplementedError, match="meta"):
        build_weighting("pcgrad", TASKS).to("meta").observe(losses(), present, [z], ONE_PROCESS)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_a_task_without_labels_drops_out_without_nan(name):
    weighting = build_weighting(name, TASKS)
    z = torch.randn(4, requires_grad=True)

    def step_losses():  # b has no labels: zero loss, zero gradient
        return {"a": (z**2).sum(), "b": (z * 0).sum()}

    losses, present = step_losses(), torch.tensor([True, False])
    if weighting.needs_gradients:
        weighting.observe(losses, present, [z], ONE_PROCESS)
    total = weighting(losses, present, step=0)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert weighting.weights[1] == 0 and weighting.weights[0] > 0
    losses, nothing = step_losses(), torch.tensor([False, False])
    if weighting.needs_gradients:
        weighting.observe(losses, nothing, [z], ONE_PROCESS)
    total = weighting(losses, nothing, step=1)
    assert torch.isfinite(total) and total.item() == 0.0


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "cagrad", "gradnorm"])
def test_an_overflowing_fp16_step_keeps_the_last_weights(name):
    weighting = build_weighting(name, TASKS)
    z = torch.randn(4, requires_grad=True)
    losses = {"a": (z**2).sum(), "b": (3 * z).sum()}
    weighting.observe(losses, BOTH, [z], ONE_PROCESS)
    before = weighting.current.clone()
    assert torch.isfinite(before).all() and before.sum() > 0
    scaler = SimpleNamespace(get_scale=lambda: float("inf"))  # the loss scale at the moment gradients overflow
    weighting.observe(losses, BOTH, [z], SimpleNamespace(**{**vars(ONE_PROCESS), "scaler": scaler}))
    assert torch.equal(weighting.current, before)  # no NaN weights; the scaler skips this step anyway


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "cagrad", "gradnorm"])
def test_a_real_fp16_loss_scale_cancels_out(name):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(torch.ones(()))  # from the first backward on, the scale lives in a tensor
    z = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)

    def losses():
        return {"a": (z**2).sum(), "b": (3 * z).sum()}

    plain, scaled = build_weighting(name, TASKS), build_weighting(name, TASKS)
    for _ in range(3):
        plain.observe(losses(), BOTH, [z], ONE_PROCESS)
        scaled.observe(losses(), BOTH, [z], SimpleNamespace(**{**vars(ONE_PROCESS), "scaler": scaler}))
    torch.testing.assert_close(scaled.current, plain.current)


@pytest.mark.parametrize("name", ["pcgrad", "gradnorm"])
def test_with_gradient_accumulation_each_micro_batch_is_weighted_by_its_own_gradients(name):
    from accelerate import Accelerator

    from mmfusion import FusionModel
    from mmfusion.weighting import weighted_backward

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import tiny_batch, tiny_config

    torch.manual_seed(0)
    model = FusionModel(tiny_config("simple_cnn", "gru", "concat"))
    batches = [tiny_batch(seed=0), tiny_batch(seed=1)]

    def micro_step(accelerator, weighting, batch):
        torch.manual_seed(batch["input_ids"].sum().item())  # the same dropout for a batch in both runs
        out = model(**batch)
        present = torch.stack([out.task_losses[n].detach() != 0 for n in weighting.names])
        weighted_backward(accelerator, model, weighting, out, present, step=0)
        return weighting.current.clone()

    alone = SimpleNamespace(**vars(ONE_PROCESS), backward=lambda loss: loss.backward())
    weighting, expected_weights, expected_grads = build_weighting(name, model.config.tasks), [], []
    for batch in batches:  # each micro-batch on its own, from fresh gradients
        model.zero_grad()
        expected_weights.append(micro_step(alone, weighting, batch))
        expected_grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
    model.zero_grad()
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    weighting = build_weighting(name, model.config.tasks)
    weights = [micro_step(accelerator, weighting, batch) for batch in batches]
    for got, want in zip(weights, expected_weights):
        torch.testing.assert_close(got, want)
    for parameter, first, second in zip(model.parameters(), *expected_grads):
        if first is not None:  # accelerate divides each micro-batch's loss by the accumulation steps
            torch.testing.assert_close(parameter.grad, (first + second) / 2, rtol=1e-4, atol=1e-6)


def test_weighting_state_round_trips(tmp_path):
    weighting = build_weighting("dwa", TASKS)
    weighting({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}, BOTH, step=0)
    weighting.end_epoch(ONE_PROCESS)
    weighting.save(tmp_path)
    restored = build_weighting("dwa", TASKS)
    restored.load(tmp_path)
    assert torch.equal(restored.history, weighting.history) and restored.epochs_seen == 1


@pytest.mark.slow
def test_two_processes_compute_the_same_weights_and_apply_the_same_update(tmp_path):
    script = Path(__file__).with_name("ddp_weighting_check.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path)}
    command = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("pcgrad", "mgda", "cagrad", "gradnorm", "uncertainty", "nll"):
        assert f"{name}: same weights and update on both processes" in result.stdout


def test_deep_supervision_schedules():
    from mmfusion.training import aux_scale

    assert [aux_scale("constant", s, 10) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    assert [aux_scale("linear_decay", s, 10) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert aux_scale("cosine_decay", 0, 10) == 1.0 and aux_scale("cosine_decay", 10, 10) < 1e-12
    assert 0.49 < aux_scale("cosine_decay", 5, 10) < 0.51


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
