"""What the training loop uses besides data and model: optimizer groups, the learning-rate schedule, fitting a run
into a time budget, per-batch seeding, and the training state it saves and resumes.

Training state lives in `output_dir/checkpoints/step_N/` (accelerate's `save_state`, the loss weighting's state,
each process's matching memories and `trainer_state.json`); each is written to a hidden temporary directory first
and renamed, so `latest` never picks a half-written one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .errors import CheckpointWriteError, InputError
from .model import FusionModel
from .pretrained import timm_has_weights

STATE_NAME = "trainer_state.json"
MEMORY_NAME = "matching_memory_{}.safetensors"
"""A process's matching heads' remembered pairs (train.matching_memory), by process index."""
STEP_DIR = re.compile(r"^step_(\d+)$")


# ----- optimisation -----


def pretrained_modules(model: FusionModel, train: TrainConfig) -> list[torch.nn.Module]:
    """Parts that start from pretrained weights (every encoder, after --train.init_from; a dual encoder's matching
    heads); they train at `encoder_lr` (LoRA adapters too) and are the ones `freeze_encoders_steps` holds still."""
    if train.init_from:
        return [model.image_encoder, model.text_encoder]
    config = model.config
    modules = []
    timm_weights = config.image_encoder == "timm" and timm_has_weights(config.image_model)
    if config.image_weights or config.image_encoder == "hf" or timm_weights:
        modules.append(model.image_encoder)
    if config.text_encoder == "hf":
        modules.append(model.text_encoder)
    if config.pretrained:
        modules += [model.heads[spec.name] for spec in config.tasks if spec.type == "matching"]
    return modules


def _block(name: str) -> str | None:
    """The numbered block a parameter belongs to: its name up to the first purely numeric part
    (`encoder.layer.3`, `blocks.3`, `layer1.0`, `stages.2`), None outside any block."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def layer_scales(module: torch.nn.Module, decay: float) -> dict[int, float]:
    """Learning-rate multiplier of each parameter (by id) for layer-wise decay: blocks numbered in order 1..N,
    parameters before the first block (embeddings) 0, after the last (final norm, pooler) N + 1; a parameter at
    layer l gets decay^(N + 1 - l)."""
    named = list(module.named_parameters())
    blocks = list(dict.fromkeys(b for b in map(_block, (name for name, _ in named)) if b is not None))
    number = {block: i + 1 for i, block in enumerate(blocks)}
    top = len(blocks) + 1
    scales, layer = {}, 0
    for name, parameter in named:
        block = _block(name)
        if block is not None:
            layer = number[block]
        elif layer:  # after the blocks
            layer = top
        scales[id(parameter)] = decay ** (top - layer) if blocks else 1.0
    return scales


def build_optimizer(model: FusionModel, train: TrainConfig, weighting_parameters=()) -> torch.optim.AdamW:
    """AdamW; pretrained parts at encoder_lr (pretrained encoders' layers scaled down by `layer_decay` from the top),
    the loss weighting's parameters at weighting_lr (0: lr), the rest at lr; no weight decay on norms, biases and
    scalars. Each group records whether it is `pretrained`, for the schedule."""
    scales: dict[int, float] = {}
    for module in pretrained_modules(model, train):
        is_encoder = module is model.image_encoder or module is model.text_encoder
        scales.update(layer_scales(module, train.layer_decay) if is_encoder else layer_scales(module, 1.0))
    groups: dict[tuple[bool, bool, float], list] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            scale = scales.get(id(parameter))
            key = (scale is not None, parameter.ndim >= 2, scale or 1.0)
            groups.setdefault(key, []).append(parameter)
    param_groups = [
        {
            "params": params,
            "lr": train.encoder_lr * scale if is_pretrained else train.lr,
            "weight_decay": train.weight_decay if decays else 0.0,
            "pretrained": is_pretrained,
        }
        for (is_pretrained, decays, scale), params in sorted(groups.items())
    ]
    learned_weights = [p for p in weighting_parameters if p.requires_grad]
    if learned_weights:
        lr = train.weighting_lr or train.lr
        param_groups.append({"params": learned_weights, "lr": lr, "weight_decay": 0.0, "pretrained": False})
    return torch.optim.AdamW(param_groups, fused=torch.cuda.is_available() or None)  # on CPU the default is fastest


@dataclass
class StepPlan:
    """The number of optimizer steps of the run. The schedule reads it at every step, so a time budget can set it
    once the step time is known (the warmup and the annealing then follow the planned length)."""

    total: int


def build_scheduler(optimizer, train: TrainConfig, plan: StepPlan) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for warmup_ratio of the steps, then cosine, linear or constant; pretrained encoders stay at
    learning rate 0 (frozen) for the first `freeze_encoders_steps` steps."""

    def factor(step: int) -> float:
        total_steps = plan.total
        warmup = int(train.warmup_ratio * total_steps)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if train.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if train.scheduler == "linear":
            return 1.0 - progress
        return 1.0

    def frozen_first(step: int) -> float:
        return 0.0 if step < train.freeze_encoders_steps else factor(step)

    factors = [frozen_first if group["pretrained"] else factor for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def epochs_for(rows: int, at_3000_rows: float, min_epochs: float) -> float:
    """`train.epochs` 0: `at_3000_rows` passes at 3,000 training rows, scaled by sqrt(3000 / rows), within
    [min_epochs, 30] (2 decimals): a smaller set gets more passes, a larger one at least `min_epochs`."""
    return round(min(30.0, max(min_epochs, at_3000_rows * math.sqrt(3000 / max(1, rows)))), 2)


def aux_scale(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of every deep-supervision loss at `step`: 1 throughout, or decaying from 1 to 0."""
    progress = min(1.0, step / max(1, total_steps))
    if schedule == "linear_decay":
        return 1.0 - progress
    if schedule == "cosine_decay":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def regression_share(warmup: float, step: int, total_steps: int) -> float:
    """Share of each regression's gradient that reaches the model at `step`: rising linearly from 0 to 1 over the
    first `warmup` of the planned steps (1 throughout at warmup 0)."""
    if not warmup:
        return 1.0
    return min(1.0, step / max(1.0, warmup * total_steps))


def set_cpu_threads(accelerator, requested: int) -> None:
    """On CPU, use the physical cores (split among local processes) unless a thread count is requested."""
    if accelerator.device.type != "cpu":
        return
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(requested or max(1, cores // accelerator.num_processes))


@dataclass
class TimeBudget:
    """Fits a whole run, start-up to report, into `limit` seconds from `start` (a `time.perf_counter()` value).

    After `warmup_steps` measured steps and one timed evaluation, `plan` sets the number of steps so that the
    steps, the evaluations they bring and the end of the run (final save, test split, report) fit; the trainer
    plans again after each evaluation, so the schedule anneals over what the machine really delivers.
    `must_stop` is the guard if an estimate was too hopeful.
    """

    limit: float
    start: float
    warmup_from: int = 2  # steps before the measurement (they pay for caches and allocations)
    warmup_steps: int = 10  # steps measured before the first plan
    end_seconds: float = 0.0  # planned time for the end of the run

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def plan(self, step_seconds: float, evaluation_seconds: float, evaluations, end_seconds: float, done: int) -> int:
        """The total steps that fit: `evaluations(steps)` is how many evaluations a run of `steps` steps makes."""
        self.end_seconds = end_seconds
        left = self.limit - self.elapsed() - end_seconds
        steps = done
        for _ in range(4):  # a fixed point: more steps bring more evaluations
            steps = done + int(max(0.0, left - evaluations(steps) * evaluation_seconds) / max(step_seconds, 1e-9))
        return max(done + 1, steps)

    def must_stop(self, evaluation_seconds: float) -> bool:
        """Whether the run must end now to finish its last evaluation and the end within the limit."""
        return self.elapsed() + evaluation_seconds + self.end_seconds >= self.limit


def seed_step(seed: int, epoch: int, batch: int, process: int) -> None:
    """Re-seed torch from (seed, epoch, batch, process) before each batch: dropout and random loss weights then
    depend on nothing else, so a resumed run draws exactly what an uninterrupted one drew."""
    torch.manual_seed(((seed * 10_007 + epoch) * 10_000_019 + batch) * 256 + process)


# ----- training state -----


@dataclass
class TrainerState:
    """Where the loop is, saved as JSON beside accelerate's state."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # loader batches already consumed in `epoch`
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict | None = None  # validation metrics of best/
    last_metrics: dict | None = None  # the latest validation metrics
    skipped_steps: int = 0  # fp16 steps skipped by the loss scaler
    total_steps: int | None = None  # the planned length (a time budget plans it once)
    evaluations_since_best: int = 0  # for early stopping
    stream_rows: list[int] | None = None  # a training stream: the rows each process has read in this epoch


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete training states, oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint to resume: `latest` (None when there is none yet: a fresh start), or a step_N directory."""
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise InputError(f"--train.resume {resume}: not a complete training checkpoint (no {STATE_NAME})")
    return path


def save_training_state(accelerator, output_dir: Path, state: TrainerState, keep: int, weighting, model) -> Path:
    """accelerate's save_state, the loss weighting's state and the matching memories into a temporary directory,
    renamed to step_N once complete; keeps the last `keep`."""
    root = output_dir / "checkpoints"
    final = root / f"step_{state.step}"
    staging = root / f".step_{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        save_matching_memories(accelerator.unwrap_model(model), staging / MEMORY_NAME.format(accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            weighting.save(staging)
            (staging / STATE_NAME).write_text(json.dumps(asdict(state), indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        previous = checkpoint_dirs(output_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"saving the training state at step {state.step} failed ({error}); {kept}") from None
    if accelerator.is_main_process:
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, directory: Path, weighting, model) -> TrainerState:
    weighting.load(directory)
    accelerator.load_state(str(directory))
    load_matching_memories(accelerator.unwrap_model(model), directory / MEMORY_NAME.format(accelerator.process_index))
    return TrainerState(**json.loads((directory / STATE_NAME).read_text()))


def save_matching_memories(model: FusionModel, path: Path) -> None:
    """The pairs each matching head remembers, so that a resumed run ranks the same candidates (none: no file)."""
    memories = {name: head.memory for name, head in model.heads.items() if getattr(head, "memory", None) is not None}
    if memories:
        save_file({name: memory.detach().cpu().contiguous() for name, memory in memories.items()}, path)


def load_matching_memories(model: FusionModel, path: Path) -> None:
    if path.is_file():
        device = next(model.parameters()).device
        for name, memory in load_file(path).items():
            model.heads[name].memory = memory.to(device)


class StopSignal:
    """While active (a `with` block), SIGTERM / SIGINT ask the loop to save and stop at the next step instead of
    dying mid-step; the previous handlers come back afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignal:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum
