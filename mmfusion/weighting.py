"""How task losses combine into the loss that is back-propagated: static weights, the joint likelihood (nll),
learned or adaptive weights (uncertainty, DWA, RLW, GLS) and weights from the task gradients (PCGrad, MGDA,
CAGrad, GradNorm via torchjd), with the plumbing those need under gradient accumulation, several processes and
fp16 loss scaling.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import TaskSpec
from .errors import InputError

REGRESSION_TYPES = ("regression", "dense_regression")


class LossWeighting(nn.Module):
    """`sum`: each task's loss times its TaskSpec weight. Subclasses learn or adapt the weights.

    `forward(task_losses, present, step)` returns the loss to back-propagate. A task that is not `present` (no
    labels in the batch) drops out of the combination. `weights` keeps the last effective weight of each task,
    for logging. State (buffers, parameters) is saved as safetensors beside a training checkpoint.

    `regression_share` s < 1 passes only s of each regression's gradient to the model (train.regression_warmup):
    the combined loss's value, and the gradient a learned weight gets, stay whole.
    """

    FILE = "loss_weighting.safetensors"
    needs_gradients = False  # gradient-based weightings look at per-task gradients before the backward

    def __init__(self, tasks: list[TaskSpec], seed: int = 0) -> None:
        super().__init__()
        self.names = [t.name for t in tasks]
        self.seed = seed
        self.register_buffer("static", torch.tensor([t.weight for t in tasks], dtype=torch.float32))
        self.register_buffer("weights", self.static.clone())
        regression = [t.type in REGRESSION_TYPES for t in tasks]
        self.register_buffer("regression", torch.tensor(regression), persistent=False)
        self.regression_share = 1.0  # of each regression's gradient that reaches the model; the trainer ramps it

    def task_weights(self, losses: torch.Tensor, present: torch.Tensor, step: int) -> torch.Tensor:
        return self.static

    def regulariser(self, present: torch.Tensor) -> torch.Tensor | float:
        return 0.0

    def forward(self, task_losses: dict[str, torch.Tensor], present: torch.Tensor, step: int) -> torch.Tensor:
        losses = torch.stack([task_losses[name].float() for name in self.names])
        weights = torch.where(present, self.task_weights(losses, present, step), torch.zeros_like(losses))
        share = torch.where(self.regression, self.regression_share, 1.0)
        self.weights = (weights * share).detach()
        # An absent task's loss is an exact zero still tied to its head: weight 0 keeps every parameter in the
        # graph, which DDP requires of all processes.
        return (weights * (share * losses + (1 - share) * losses.detach())).sum() + self.regulariser(present)

    def observe_losses(self, task_losses: dict[str, torch.Tensor], present: torch.Tensor, accelerator) -> None:
        """Called on every process before each combination, for running statistics of the losses."""

    def end_epoch(self, accelerator) -> None:
        """Called once per epoch on every process."""

    def last_weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights.tolist()))

    @property
    def stateful(self) -> bool:
        """Whether the weighting carries state that a resume needs (beyond the static and last logged weights)."""
        return bool(set(self.state_dict()) - {"static", "weights"})

    def save(self, directory: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, Path(directory) / self.FILE)

    def load(self, directory: Path) -> None:
        """Restore the state saved in a training checkpoint; a stateful weighting refuses a checkpoint without it."""
        path = Path(directory) / self.FILE
        if path.is_file():
            self.load_state_dict(load_file(path, device=str(self.static.device)))
        elif self.stateful:
            raise InputError(
                f"{directory} has no {self.FILE}: the {type(self).__name__} state of this run is missing, so a resume "
                "from it would restart the loss weighting; resume from another checkpoint"
            )


def outcome_counts(tasks: list[TaskSpec]) -> list[float]:
    """How many outcomes each task's loss stands for: K for a multilabel loss (the mean over its K labels), else 1."""
    return [float(t.num_labels) if t.type == "multilabel" else 1.0 for t in tasks]


LIKELIHOOD_FACTORS = {"mse": 0.5, "huber": 0.5, "l1": 1.0}
"""A regression loss L -> the factor c of its profile negative log-likelihood c log L (Gaussian for mse and huber,
Laplace for l1) once the noise scale is set to its maximum-likelihood value; other losses (silog) keep weight 1."""


class LikelihoodWeighting(LossWeighting):
    """`nll`: the tasks' losses as one negative log-likelihood of a row's labels. A cross-entropy is one (weight 1);
    a multilabel loss, the mean over its K binary labels, is 1/K of one (weight K). A regression's loss L is one
    once its noise scale is set to its maximum-likelihood value, which leaves c log L (c = 0.5 for mse), so at every
    step the regression gets the weight c / L: a regression fitted well keeps improving, with no learned weight
    lagging behind its falling loss (uncertainty's) and no weight taken from a classification that is still hard.
    A dense task counts as one outcome per image. Under DDP each process weighs its own batch's loss (DDP's averaged
    gradient keeps their parameters equal). Nothing is learned, so FSDP accepts it.

    With `noise_decay` d > 0 the noise variance is instead a running mean of the loss over recent batches (each
    batch's loss averaged over the processes, then noise <- d noise + (1 - d) loss): the maximum-likelihood noise
    of recent data rather than of the batch alone, so a batch the regression still gets wrong weighs more."""

    def __init__(self, tasks: list[TaskSpec], seed: int = 0, noise_decay: float = 0.0) -> None:
        super().__init__(tasks, seed)
        self.factors = [
            LIKELIHOOD_FACTORS.get(t.loss or "mse", 0.0) if t.type in REGRESSION_TYPES else 0.0 for t in tasks
        ]
        self.outcomes = outcome_counts(tasks)
        self.noise_decay = noise_decay
        if noise_decay:  # state only then, so checkpoints of the per-batch form stay loadable as they were
            self.register_buffer("noise", torch.zeros(len(tasks)))  # 0: no loss seen yet

    def observe_losses(self, task_losses, present, accelerator) -> None:
        if not self.noise_decay:
            return
        losses = torch.stack([task_losses[name].detach().float() for name in self.names])
        total = torch.stack([losses * present, present.float()])
        total = accelerator.reduce(total, "sum") if accelerator.num_processes > 1 else total
        mean, seen = total[0] / total[1].clamp(min=1), total[1] > 0
        running = torch.where(self.noise > 0, self.noise_decay * self.noise + (1 - self.noise_decay) * mean, mean)
        self.noise = torch.where(seen, running, self.noise)

    def task_weights(self, losses, present, step):
        factors, outcomes = losses.new_tensor(self.factors), losses.new_tensor(self.outcomes)
        noise = losses.detach()
        if self.noise_decay:
            noise = torch.where(self.noise > 0, self.noise, noise)
        return self.static * torch.where(factors > 0, factors / noise.clamp(min=1e-6), outcomes)


class UncertaintyWeighting(LossWeighting):
    """Learned homoscedastic uncertainty (Kendall et al. 2018): sum of exp(-s_t) L_t + s_t, s_t = log sigma_t^2.
    At the optimum exp(-s_t) = 1 / L_t, so a noisier task gets a smaller weight.

    `start` "outcomes" starts each weight at the task's number of outcomes, as nll counts them: a multilabel loss,
    the mean over its K binary labels, starts at weight K, every other task at 1 ("one": all at 1). The weights
    move by about the learning rate per step, so on a small set the start is most of what a weight ever is.

    `max_weight` W > 0 keeps each classification's and multilabel task's weight at most W times its start
    (s_t >= -log(W w_t0)): a cross-entropy falling towards zero would otherwise raise its weight without end, taking
    the shared encoders from the tasks still being fitted. `regression_max_weight` R > 0 bounds each regression's
    weight at R times its start in the same way (0: unbounded)."""

    def __init__(
        self,
        tasks: list[TaskSpec],
        seed: int = 0,
        start: str = "one",
        max_weight: float = 0.0,
        regression_max_weight: float = 0.0,
    ) -> None:
        super().__init__(tasks, seed)
        starts = outcome_counts(tasks) if start == "outcomes" else [1.0] * len(tasks)
        self.log_variance = nn.Parameter(-torch.log(torch.tensor(starts)))
        bounds = {"classification": max_weight, "multilabel": max_weight, "regression": regression_max_weight}
        floors = [
            -math.log(bounds[t.type] * weight) if bounds.get(t.type, 0.0) > 0 else -math.inf
            for t, weight in zip(tasks, starts)
        ]
        self.register_buffer("floor", torch.tensor(floors), persistent=False)

    def bounded_log_variance(self) -> torch.Tensor:
        """The log-variances, each at least its floor (no gradient below it, so a bounded one stays put)."""
        return torch.maximum(self.log_variance, self.floor)

    def task_weights(self, losses, present, step):
        return self.static * torch.exp(-self.bounded_log_variance())

    def regulariser(self, present):
        return (self.bounded_log_variance() * present).sum()


class DynamicWeightAverage(LossWeighting):
    """DWA (Liu et al. 2019): w_t = T softmax(r_t / temperature), r_t = L_t(e-1) / L_t(e-2) of epoch-mean losses."""

    temperature = 2.0

    def __init__(self, tasks: list[TaskSpec], seed: int = 0) -> None:
        super().__init__(tasks, seed)
        count = len(tasks)
        self.register_buffer("epoch_sum", torch.zeros(count))
        self.register_buffer("epoch_count", torch.zeros(count))
        self.register_buffer("history", torch.zeros(2, count))  # epoch-mean losses of the last two epochs
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def task_weights(self, losses, present, step):
        self.epoch_sum += losses.detach() * present
        self.epoch_count += present
        if self.epochs_seen < 2:
            return self.static
        ratio = self.history[1] / self.history[0].clamp(min=1e-8)
        return self.static * len(self.names) * torch.softmax(ratio / self.temperature, dim=0)

    def end_epoch(self, accelerator) -> None:
        total = torch.stack([self.epoch_sum, self.epoch_count])
        total = accelerator.reduce(total, "sum") if accelerator.num_processes > 1 else total
        mean = total[0] / total[1].clamp(min=1)
        self.history = torch.stack([self.history[1], torch.where(total[1] > 0, mean, self.history[1])])
        self.epochs_seen += 1
        self.epoch_sum.zero_()
        self.epoch_count.zero_()


class RandomLossWeighting(LossWeighting):
    """RLW (Lin et al. 2022): weights drawn each step from softmax of a standard normal, seeded by (seed, step)."""

    def task_weights(self, losses, present, step):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draw = torch.randn(len(self.names), generator=generator).to(losses.device)
        return self.static * len(self.names) * torch.softmax(draw.masked_fill(~present, float("-inf")), dim=0)


class GeometricLossStrategy(LossWeighting):
    """GLS (Chennupati et al. 2019): the geometric mean of the task losses, (prod L_t)^(1/T) over present tasks.
    Its effective weight on task t is the gradient of that mean: total / (T L_t)."""

    def forward(self, task_losses, present, step):
        losses = torch.stack([task_losses[name].float() for name in self.names]).clamp(min=1e-8)
        count = present.sum().clamp(min=1)
        total = torch.exp((torch.log(losses) * present).sum() / count)
        self.weights = torch.where(present, total.detach() / (count * losses.detach()), torch.zeros_like(losses))
        return total if bool(present.any()) else (losses * 0).sum()


def loss_scale(accelerator) -> torch.Tensor | float:
    """The fp16 loss scale (1 without a scaler), as the scaler's device tensor once it has one: reading it as a
    number (`get_scale()`) would make the host wait for the GPU at every step."""
    scaler = accelerator.scaler
    if scaler is None:
        return 1.0
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None  # torch's GradScaler
    return scale if scale is not None else scaler.get_scale()


class GradientWeighting(LossWeighting):
    """Weights from the per-task gradients (PCGrad, MGDA, CAGrad via torchjd's weightings; GradNorm).

    `observe` computes each present task's gradient on the shared parameters (or the shared representation),
    averages it across processes, and derives the weights from the Gramian of those gradients; the usual
    backward of the weighted loss then applies the combination, identically on every process. Tasks with no
    labels in the batch (zero gradient) are left out, so no division by a zero norm can happen.
    """

    needs_gradients = True
    space = "parameters"  # or "representation": gradients with respect to the fused features

    def __init__(self, tasks: list[TaskSpec], seed: int = 0) -> None:
        super().__init__(tasks, seed)
        self.register_buffer("current", self.static.clone())

    def gramian_weights(self, gramian: torch.Tensor, losses: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Weights of the tasks `index` (those with a gradient) from their Gramian and losses."""
        raise NotImplementedError

    def combination(self, gramian: torch.Tensor, losses: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Every task's weight (0 where not `active`). Here from the active tasks' sub-Gramian, which torchjd's
        solvers need: selecting it reads `active` on the host."""
        weights = torch.zeros_like(self.current)
        if active.any():
            index = active.nonzero().flatten()
            weights[index] = self.gramian_weights(gramian[index][:, index], losses[index], index).to(weights)
        return weights

    def observe(self, task_losses: dict, present: torch.Tensor, shared: list[torch.Tensor], accelerator) -> None:
        """Set this step's weights from the gradients of each task's loss with respect to `shared`."""
        scale = loss_scale(accelerator)  # fp16: the task gradients are taken scaled, as the backward's are
        # An absent task's loss is an exact zero tied to the graph: its gradient is zero. On the parameters that
        # gradient costs a backward pass, worth a host read of `present` to skip; on the representation it is
        # cheap, and computing it keeps the step free of host-device syncs.
        skip = (~present).tolist() if self.space == "parameters" else [False] * len(self.names)
        rows = []
        for name, skipped in zip(self.names, skip):
            if skipped:
                rows.append(torch.zeros(sum(t.numel() for t in shared), device=present.device))
                continue
            grads = torch.autograd.grad(task_losses[name] * scale, shared, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(t)).flatten().float() / scale
                        for g, t in zip(grads, shared)
                    ]
                )
            )
        jacobian = torch.where(present[:, None], torch.stack(rows), 0.0)
        multi = accelerator.num_processes > 1
        if self.space == "parameters":  # the same parameters everywhere: average the gradients, then the Gramian
            jacobian = accelerator.reduce(jacobian, "mean") if multi else jacobian
            gramian = jacobian @ jacobian.T
        else:  # different samples per process: their Gramians add up
            gramian = jacobian @ jacobian.T
            gramian = accelerator.reduce(gramian, "sum") if multi else gramian
        finite = torch.isfinite(gramian).all()  # not finite: an fp16 overflow, which the loss scaler skips
        losses = torch.stack([task_losses[n].detach().float() for n in self.names])
        losses = accelerator.reduce(losses, "mean") if multi else losses
        weights = self.combination(gramian, losses, (gramian.diagonal() > 0) & finite)
        self.current = torch.where(finite, weights, self.current)  # an overflow keeps the last weights

    def task_weights(self, losses, present, step):
        return self.static * self.current


class TorchJDWeighting(GradientWeighting):
    """A torchjd Gramian weighting (its combination of the task gradients, as weights on the task losses)."""

    def make(self):
        raise NotImplementedError

    def gramian_weights(self, gramian, losses, index):
        return self.make()(gramian.double()).float()


class PCGradWeighting(TorchJDWeighting):
    """PCGrad (Yu et al. 2020): each task gradient projected off the others it conflicts with, on the shared
    parameters."""

    def make(self):
        from torchjd.aggregation import PCGradWeighting as Weighting

        return Weighting()


class CAGradWeighting(TorchJDWeighting):
    """CAGrad (Liu et al. 2021), c = 0.4, on the shared parameters."""

    def make(self):
        from torchjd.aggregation import CAGradWeighting as Weighting

        return Weighting(c=0.4)


class MGDAWeighting(TorchJDWeighting):
    """MGDA-UB (Sener and Koltun 2018): the min-norm combination of the gradients on the shared representation,
    scaled so the weights sum to the number of tasks."""

    space = "representation"

    def gramian_weights(self, gramian, losses, index):
        from torchjd.aggregation import MGDAWeighting as Weighting

        return Weighting()(gramian.double()).float() * len(gramian)


class GradNormWeighting(GradientWeighting):
    """GradNorm (Chen et al. 2018) on the shared representation: weights move so that each task's weighted
    gradient norm approaches the mean norm times its relative inverse training rate to the power `alpha` (0: the
    norms are made equal, whatever each loss has done so far). Each step clamps every weight at `min_weight`, then
    rescales the weights to sum to the number of tasks. A squared error falls by orders of magnitude more than a
    cross-entropy, so a regression's training rate, and with it its weight, falls to that minimum."""

    space = "representation"
    learning_rate = 0.025

    def __init__(self, tasks: list[TaskSpec], seed: int = 0, alpha: float = 1.5, min_weight: float = 1e-3) -> None:
        super().__init__(tasks, seed)
        self.alpha = alpha
        self.min_weight = min_weight
        self.register_buffer("learned", torch.ones(len(tasks)))
        self.register_buffer("initial_loss", torch.zeros(len(tasks)))

    def combination(self, gramian, losses, active):
        """One GradNorm update over the active tasks, as masks rather than an index: no host-device sync."""
        count = active.sum().clamp(min=1)

        def mean(values: torch.Tensor) -> torch.Tensor:
            return torch.where(active, values, 0.0).sum() / count

        norms = gramian.diagonal().clamp(min=0).sqrt()
        start = torch.where(self.initial_loss > 0, self.initial_loss, losses)  # a task's first loss: its reference
        self.initial_loss = torch.where(active, start, self.initial_loss)
        rates = losses / start.clamp(min=1e-12)
        weighted = self.learned * norms
        target = mean(weighted) * (rates / mean(rates)) ** self.alpha
        learned = (self.learned - self.learning_rate * torch.sign(weighted - target)).clamp(min=self.min_weight)
        learned = learned * active.sum() / torch.where(active, learned, 0.0).sum()
        self.learned = torch.where(active, learned, self.learned)
        return torch.where(active, self.learned, 0.0)


WEIGHTINGS = {
    "sum": LossWeighting,
    "nll": LikelihoodWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "rlw": RandomLossWeighting,
    "gls": GeometricLossStrategy,
    "pcgrad": PCGradWeighting,
    "mgda": MGDAWeighting,
    "cagrad": CAGradWeighting,
    "gradnorm": GradNormWeighting,
}


def build_weighting(
    name: str,
    tasks: list[TaskSpec],
    seed: int = 0,
    gradnorm_alpha: float = 1.5,
    gradnorm_min_weight: float = 1e-3,
    nll_noise_decay: float = 0.0,
    uncertainty_start: str = "one",
    uncertainty_max_weight: float = 0.0,
    uncertainty_regression_max_weight: float = 0.0,
) -> LossWeighting:
    """The weighting `name` over `tasks`. The keyword defaults are each method as published (uncertainty: every weight
    starting at 1, no bound); train.py passes TrainConfig's values, the recipe chosen on the suite."""
    if name not in WEIGHTINGS:
        raise InputError(f"--train.loss_weighting {name!r} is not available; choose from {sorted(WEIGHTINGS)}")
    if name == "gradnorm":
        return GradNormWeighting(tasks, seed, alpha=gradnorm_alpha, min_weight=gradnorm_min_weight)
    if name == "nll":
        return LikelihoodWeighting(tasks, seed, noise_decay=nll_noise_decay)
    if name == "uncertainty":
        return UncertaintyWeighting(
            tasks,
            seed,
            start=uncertainty_start,
            max_weight=uncertainty_max_weight,
            regression_max_weight=uncertainty_regression_max_weight,
        )
    return WEIGHTINGS[name](tasks, seed)


# ----- the training step's side -----


def shared_tensors(model, output, weighting) -> list[torch.Tensor]:
    """What gradient-based weightings differentiate: the trainable parameters outside the task heads (a dense
    task's decoder is its head), or the shared representation the heads read (the fused features, each encoder's
    pooled vector and, with dense tasks, the image feature maps their decoders read)."""
    if weighting.space == "representation":
        return [output.fused, *output.extras["pooled"].values(), *output.extras.get("image_maps", [])]
    return [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and ".heads." not in f".{name}" and "aux_heads." not in name
    ]


def ddp_sync_disabled(accelerator, model, weighting):
    """Gradient-based weightings differentiate each task before the real backward, which DDP's reducer does not
    allow; with several processes they run outside DDP's sync and `average_gradients` does its job instead."""
    if weighting.needs_gradients and accelerator.num_processes > 1:
        return accelerator.no_sync(model)
    return contextlib.nullcontext()


def weighted_backward(accelerator, model, weighting, output, present: torch.Tensor, step: int) -> torch.Tensor:
    """Combine the task losses with `weighting` (after it has seen the task gradients, if it needs them), then
    back-propagate the combination. Returns the combined loss."""
    if weighting.needs_gradients:
        weighting.observe(output.task_losses, present, shared_tensors(model, output, weighting), accelerator)
    weighting.observe_losses(output.task_losses, present, accelerator)
    loss = weighting(output.task_losses, present, step)
    accelerator.backward(loss)
    return loss


def average_gradients(accelerator, model, weighting) -> None:
    """At an optimizer step: average what DDP did not (all gradients when its sync was off, and the weighting's
    own parameters, which live outside DDP) so every process applies the same update."""
    parameters = list(weighting.parameters())
    if weighting.needs_gradients:
        parameters += list(model.parameters())
    parameters = [p for p in parameters if p.grad is not None]
    if accelerator.num_processes == 1 or not parameters:
        return
    flat = accelerator.reduce(torch.cat([p.grad.flatten() for p in parameters]), "mean")
    for parameter, grad in zip(parameters, flat.split([p.numel() for p in parameters])):
        parameter.grad.copy_(grad.view_as(parameter.grad))
