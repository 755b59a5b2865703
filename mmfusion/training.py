"""The parts of train.py that are not the loop itself: data preparation, optimizer, schedule, training state.

Training state lives in `output_dir/checkpoints/step_N/` (accelerate's `save_state` plus `trainer_state.json`);
each is written to a hidden temporary directory first and renamed, so `latest` never picks a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import Config, DataConfig, TaskSpec, TrainConfig
from .data import (
    Collator,
    FusionDataset,
    FusionStream,
    LoadedData,
    RowReader,
    SkipReport,
    check_columns,
    check_split,
    fit_tasks,
    infer_tasks,
    load_dataset,
)
from .errors import CheckpointWriteError, InputError
from .model import FusionModel
from .pretrained import image_settings_for, resolve_pretrained, text_settings_for, timm_has_weights
from .processing import FusionProcessor, ProcessorSettings, hf_tokenizer, train_tokenizer

STATE_NAME = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


# ----- data -----


@dataclass
class PreparedData:
    tasks: list[TaskSpec]
    processor: FusionProcessor
    datasets: dict[str, torch.utils.data.Dataset]
    report: SkipReport
    notes: list[str] = field(default_factory=list)  # what was inferred, to show the user


def build_processor(config: Config, tasks: list[TaskSpec], loaded: LoadedData) -> FusionProcessor:
    """The HF model's tokenizer for `hf`, else a tokenizer trained on the training text; model.vocab_size follows.
    Images and texts are prepared as the pretrained encoders expect (`pretrained.image_settings_for`)."""
    model, data = config.model, config.data
    resolved = resolve_pretrained(model)
    images, texts = image_settings_for(resolved, data), text_settings_for(resolved, data)
    settings = ProcessorSettings(**images, **texts, max_image_pixels=data.max_image_pixels)
    if model.text_encoder == "hf":
        tokenizer, settings.pad_id = hf_tokenizer(model.text_model)
    else:
        train = loaded.splits["train"]
        texts = train[data.text_column] if not loaded.streaming else (r[data.text_column] for r in train.take(100_000))
        tokenizer = train_tokenizer((t for t in texts if isinstance(t, str)), data.tokenizer, model.vocab_size)
        model.vocab_size = tokenizer.get_vocab_size()
    model.max_text_length = max(model.max_text_length, data.max_text_length)
    return FusionProcessor(tokenizer, settings)


def prepare_data(config: Config, processor: FusionProcessor | None = None, splits=("train", "validation", "test")):
    """Load, infer and fit tasks, build the processor, check every row; returns datasets per split."""
    data = config.data
    loaded = load_dataset(data.path, data)
    notes = []
    tasks = config.tasks
    if not tasks:
        tasks, notes = infer_tasks(loaded.splits["train"], data)
    present = [name for name in splits if name in loaded.splits]
    for name in present:
        check_columns(loaded.splits[name], name, tasks, data)
    tasks = fit_tasks(tasks, loaded.splits["train"], data)
    if processor is None:
        processor = build_processor(config, tasks, loaded)
    report = SkipReport()
    datasets = {}
    for name in present:
        split = loaded.splits[name]
        placeholder = data.missing_modality == "placeholder"
        held_out = name == "validation" and loaded.held_out
        reader = RowReader(processor, tasks, data, loaded.roots[name], name, placeholder, held_out)
        train = name == "train"
        augment = train and data.augment
        dropout = config.train.modality_dropout if train else 0.0
        if loaded.streaming:
            datasets[name] = FusionStream(split, reader, data.on_error, augment, config.train.seed, dropout)
        else:
            split = check_split(split, name, reader, report, data.on_error, data.verify_images)
            datasets[name] = FusionDataset(split, reader, augment, config.train.seed, dropout)
    return PreparedData(tasks, processor, datasets, report, notes)


def loader_workers(data: DataConfig, accelerator) -> int:
    """`--data.num_workers`, or when unset: 4 per process on a CUDA device (at most the CPUs this process may use,
    shared among the machine's processes); 0 on CPU, where a worker takes a core from the model
    (benchmarks/data_throughput.py measures both); 0 for a stream, which is read in the main process."""
    if data.num_workers is not None:
        return data.num_workers
    if data.streaming or accelerator.device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return min(4, cpus // max(1, local_processes))


def make_loader(
    dataset, batch_size: int, pad_id: int, shuffle: bool, workers: int, collate=None
) -> torch.utils.data.DataLoader:
    """Batches of `dataset`, collated by `collate` (default: `Collator(pad_id)`)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not isinstance(dataset, torch.utils.data.IterableDataset),
        collate_fn=collate or Collator(pad_id),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers are re-created each epoch and so see the dataset's new epoch
        prefetch_factor=4 if workers else None,
    )


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


def build_optimizer(model: FusionModel, train: TrainConfig, extra_parameters=()) -> torch.optim.AdamW:
    """AdamW; pretrained parts at encoder_lr (pretrained encoders' layers scaled down by `layer_decay` from the top),
    the rest at lr; no weight decay on norms, biases and scalars. Each group records whether it is `pretrained`,
    for the schedule."""
    scales: dict[int, float] = {}
    for module in pretrained_modules(model, train):
        is_encoder = module is model.image_encoder or module is model.text_encoder
        scales.update(layer_scales(module, train.layer_decay) if is_encoder else layer_scales(module, 1.0))
    groups: dict[tuple[bool, bool, float], list] = {}
    for parameter in [*model.parameters(), *extra_parameters]:
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
    return torch.optim.AdamW(param_groups, fused=torch.cuda.is_available() or None)  # on CPU the default is fastest


def build_scheduler(optimizer, train: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for warmup_ratio of the steps, then cosine, linear or constant; pretrained encoders stay at
    learning rate 0 (frozen) for the first `freeze_encoders_steps` steps."""
    warmup = int(train.warmup_ratio * total_steps)

    def factor(step: int) -> float:
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


def aux_scale(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of every deep-supervision loss at `step`: 1 throughout, or decaying from 1 to 0."""
    progress = min(1.0, step / max(1, total_steps))
    if schedule == "linear_decay":
        return 1.0 - progress
    if schedule == "cosine_decay":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def set_cpu_threads(accelerator, requested: int) -> None:
    """On CPU, use the physical cores (split among local processes) unless a thread count is requested."""
    if accelerator.device.type != "cpu":
        return
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    torch.set_num_threads(requested or max(1, cores // accelerator.num_processes))


def seed_step(seed: int, epoch: int, batch: int, process: int) -> None:
    """Re-seed torch from (seed, epoch, batch, process) before each batch: dropout and random loss weights then
    depend on nothing else, so a resumed run draws exactly what an uninterrupted one drew."""
    torch.manual_seed(((seed * 10_007 + epoch) * 10_000_019 + batch) * 256 + process)


def shared_tensors(model, output, weighting) -> list[torch.Tensor]:
    """What gradient-based weightings differentiate: the trainable parameters outside the task heads, or the
    shared representation every head reads (the fused features and each encoder's pooled vector)."""
    if weighting.space == "representation":
        return [output.fused, *output.extras["pooled"].values()]
    return [p for name, p in model.named_parameters() if p.requires_grad and ".heads." not in f".{name}"
            and "aux_heads." not in name]  # fmt: skip


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


def save_training_state(accelerator, output_dir: Path, state: TrainerState, keep: int) -> Path:
    """accelerate's save_state into a temporary directory, renamed to step_N once complete; keeps the last `keep`."""
    root = output_dir / "checkpoints"
    final = root / f"step_{state.step}"
    staging = root / f".step_{state.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
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


def load_training_state(accelerator, directory: Path) -> TrainerState:
    accelerator.load_state(str(directory))
    return TrainerState(**json.loads((directory / STATE_NAME).read_text()))


class StopSignal:
    """SIGTERM / SIGINT ask the loop to save and stop at the next step instead of dying mid-step."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
