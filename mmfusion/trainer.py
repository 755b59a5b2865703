"""`train(config)`: fine-tune a fusion model with accelerate, from `accelerate launch train.py` or from Python.

    run = mmfusion.train("configs/default.yaml")                  # a Config, a dict, or a YAML path
    run = mmfusion.train(config, data=df)                         # data: a path, datasets object or DataFrame(s)
    run.best, run.test                                            # best/ checkpoint and its test metrics

The loop reads top to bottom: set up, then per batch the forward, the weighted backward and the optimizer step,
then per optimizer step the bookkeeping (`Loop.after_step`: log, evaluate, save, stop), then the end of the run.
Outputs go to `train.output_dir`: config.yaml, metrics.jsonl, checkpoints/step_N/, best/, final/, test_metrics.json,
report.html.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from tqdm.auto import tqdm

from . import feature_cache
from .config import Config, FusionConfig, from_dict, with_run_defaults
from .errors import InputError
from .evaluation import CONDITIONS
from .hub import resolve_checkpoint
from .loop import Loop, Run, finish_trackers, flat_metrics
from .model import FusionModel, load_compatible, read_model_config, reuse_tasks
from .options import load_yaml, save_yaml
from .prepare import Prepared, build_splits
from .pretrained import resolve_pretrained
from .processing import FusionProcessor
from .rows import model_inputs
from .runlog import RUN_CONFIG_NAME, MetricsLog
from .training import (
    StopSignal,
    aux_scale,
    build_optimizer,
    build_scheduler,
    epochs_for,
    load_training_state,
    regression_share,
    resolve_resume,
    seed_step,
    set_cpu_threads,
)
from .weighting import average_gradients, build_weighting, ddp_sync_disabled, weighted_backward


def train(config: Config | dict | str | Path, data: Any = None, start: float | None = None) -> Run:
    """Train as `config` says; `data` (a path, a datasets object, a pandas DataFrame or a dict of them per split)
    replaces `config.data.path`; `start` (a `time.perf_counter()` value) is when the run began, for time_limit."""
    config = _as_config(config)
    start = time.perf_counter() if start is None else start
    cfg = config.train
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--train.output_dir {output_dir} exists and is not a directory")
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accumulation,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(output_dir),
        # non_blocking: batches (pinned on GPU machines) are copied to the device without the host waiting
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the process count
    )
    log = accelerator.print
    set_seed(cfg.seed)  # model initialisation and the data order
    set_cpu_threads(accelerator, cfg.cpu_threads)

    # ---- the configuration, resolved once: the model's (a checkpoint's, or what the pretrained sources say), then
    # what the data decides (tasks, label maps, vocabulary); config.yaml records the result
    init = resolve_checkpoint(cfg.init_from) if cfg.init_from else None
    config = dataclasses.replace(config, model=model_architecture(config, init))
    prepared = build_splits(config, FusionProcessor.from_pretrained(init) if init else None, source=data)
    for note in prepared.notes:
        log(note)
    log(f"data: {prepared.report.summary()}")
    config = resolve_config(config, prepared, init, data)

    # ---- model (encoders from their pretrained weights, or a fusion checkpoint's parts), weighting, optimizer
    model = FusionModel(config.model_config(), encoder_weights=init is None)
    if init:
        log(load_compatible(model, init))
    for spec in config.tasks:
        if spec.type == "matching":
            model.heads[spec.name].memory_size = cfg.matching_memory
            model.heads[spec.name].negatives = cfg.matching_negatives
    collate = use_feature_cache(model, prepared, config, accelerator)
    weighting = build_weighting(
        cfg.loss_weighting,
        config.tasks,
        cfg.seed,
        gradnorm_alpha=cfg.gradnorm_alpha,
        gradnorm_min_weight=cfg.gradnorm_min_weight,
        nll_noise_decay=cfg.nll_noise_decay,
        uncertainty_start=cfg.uncertainty_start,
        uncertainty_max_weight=cfg.uncertainty_max_weight,
        uncertainty_regression_max_weight=cfg.uncertainty_regression_max_weight,
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        model.use_channels_last(False)  # FSDP shards contiguous parameters only
        keep_batch_norm_in_float32(model, accelerator)
        if any(p.requires_grad for p in weighting.parameters()):
            raise InputError(
                f"--train.loss_weighting {cfg.loss_weighting} learns parameters outside the model, which accelerate's "
                "FSDP optimizer cannot hold or checkpoint: with FSDP choose sum, nll, dwa, rlw or gls"
            )
    optimizer = build_optimizer(model, cfg, weighting.parameters())
    loop = Loop(config, accelerator, prepared, MetricsLog(output_dir, start, accelerator.is_main_process), collate)
    scheduler = build_scheduler(optimizer, cfg, loop.plan)
    if loop.streaming:  # a training stream splits itself among the processes (streams.py): accelerate leaves it be
        model, optimizer, loop.val_loader, scheduler = accelerator.prepare(model, optimizer, loop.val_loader, scheduler)
    else:
        model, optimizer, loop.train_loader, loop.val_loader, scheduler = accelerator.prepare(
            model, optimizer, loop.train_loader, loop.val_loader, scheduler
        )
    weighting.to(accelerator.device)
    loop.model, loop.weighting = model, weighting
    log(loop.describe())

    # ---- outputs and resume
    checkpoint = resolve_resume(cfg.resume, output_dir) if cfg.resume else None
    if checkpoint:
        loop.state = load_training_state(accelerator, checkpoint, weighting, model)
        loop.plan.total = loop.state.total_steps or loop.plan.total
        loop.resume_stream()
        log(f"resumed from {checkpoint} at step {loop.state.step}")
    elif cfg.resume:
        log(f"--train.resume latest: no checkpoint under {output_dir / 'checkpoints'} yet, starting from scratch")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, output_dir / RUN_CONFIG_NAME)
    accelerator.init_trackers("mmfusion", config=flat_metrics(config.to_dict()))

    # ---- the loop
    state, unwrapped = loop.state, accelerator.unwrap_model(model)
    loop.first_step = state.step
    if loop.budget and checkpoint:  # a resumed run measures its own steps (the plan goes on from the checkpoint's)
        loop.budget.warmup_from = state.step
    loop.loop_started = loop.warmup_started = time.perf_counter()
    with StopSignal() as stop:
        loop.progress = tqdm(total=loop.plan.total, initial=state.step, disable=not accelerator.is_local_main_process)
        while not loop.done:
            loop.start_epoch()
            for batch in loop.batches():
                seed_step(cfg.seed, state.epoch, state.batches_in_epoch, accelerator.process_index)
                unwrapped.aux_scale = aux_scale(cfg.aux_schedule, state.step, loop.plan.total)
                weighting.regression_share = regression_share(cfg.regression_warmup, state.step, loop.plan.total)
                state.batches_in_epoch += 1
                with accelerator.accumulate(model), ddp_sync_disabled(accelerator, model, weighting):
                    labels = {"labels": batch["labels"], "label_mask": batch["label_mask"]}
                    out = model(**model_inputs(batch, CONDITIONS[loop.condition]), **labels)
                    present = torch.stack([batch["label_mask"][name].any() for name in weighting.names])
                    loss = weighted_backward(accelerator, model, weighting, out, present, state.step)
                    loop.check_loss(loss, out, batch)
                    if accelerator.sync_gradients:
                        average_gradients(accelerator, model, weighting)
                        if cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()  # a no-op while accumulating
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loop.add_losses(out, loss)
                if accelerator.sync_gradients:
                    loop.after_step(out, scheduler, stop.received)
                if loop.done:
                    break
            else:  # the loader ran out (a stream, or the last partial accumulation)
                loop.end_epoch()
        loop.progress.close()
    if loop.stopped_by == "signal":
        log(
            f"received signal {stop.received}: saved the training state at step {state.step}; resume with "
            "--train.resume latest"
        )
        finish_trackers(accelerator)
        return loop.result(None, None)
    return loop.finish()


def keep_batch_norm_in_float32(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Under FSDP with mixed precision, each BatchNorm layer becomes its own shard unit that computes in float32
    and hands bf16/fp16 on: FSDP casts the parameters it manages to bf16/fp16, and batch norm refuses weights of
    another type than its float32 running statistics."""
    if accelerator.mixed_precision == "no":
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=low)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            fully_shard(module.to(accelerator.device), mp_policy=policy)


def _as_config(config: Config | dict | str | Path) -> Config:
    """A Config from a Config, a dict of plain values, or a YAML file."""
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_dict(Config, config, where="config")
    return load_yaml(config)


def model_architecture(config: Config, init: Path | None) -> FusionConfig:
    """The model's configuration before the data is read: a fusion checkpoint's (--train.init_from), or ours with
    what the pretrained sources say (architectures, input size: `pretrained.resolve_pretrained`);
    --train.cache_features true freezes both encoders."""
    model = dataclasses.replace(read_model_config(init), tasks=[]) if init else resolve_pretrained(config.model)
    if config.train.cache_features:
        model = dataclasses.replace(model, freeze_image=True, freeze_text=True)
    return model


def resolve_config(config: Config, prepared: Prepared, init: Path | None, data: Any = None) -> Config:
    """The run's configuration with what the data decided (tasks with label maps and statistics, vocabulary
    size, longest text, the number of epochs when it follows the data size; with init_from, reused regression heads
    keep the checkpoint's target statistics), each task's label smoothing, loss and class weights, and where the
    data came from (`data` given in Python: its path, or a note that it was passed in memory)."""
    tasks = reuse_tasks(prepared.tasks, read_model_config(init).tasks) if init else prepared.tasks
    train = config.train
    tasks = with_run_defaults(
        tasks, train.label_smoothing, train.regression_loss, train.class_balance, prepared.label_counts
    )
    model = dataclasses.replace(config.model, **prepared.model_settings)
    path = config.data.path if data is None else str(data) if isinstance(data, (str, Path)) else None
    source = dataclasses.replace(config.data, path=path or f"(in memory: {prepared.source}, passed to mmfusion.train)")
    rows = prepared.datasets["train"]
    if not (train.epochs or train.max_steps or train.time_limit) and hasattr(rows, "__len__"):
        train = dataclasses.replace(train, epochs=epochs_for(len(rows), train.epochs_at_3000_rows, train.min_epochs))
    return dataclasses.replace(config, model=model, tasks=tasks, data=source, train=train)


def use_feature_cache(model: FusionModel, prepared: Prepared, config: Config, accelerator: Accelerator):
    """With both encoders frozen (or --train.cache_features true), replace the train and validation datasets by the
    encoders' outputs, computed once per row; returns the collate function for them (None: no cache)."""
    streaming = isinstance(prepared.datasets["train"], torch.utils.data.IterableDataset)
    if not feature_cache.wanted(config.train.cache_features, model, streaming):
        return None
    if config.data.augment:
        accelerator.print("feature cache: training images are not augmented (features are computed once per row)")
    model.to(accelerator.device)
    for name in ("train", "validation"):
        prepared.datasets[name], note = feature_cache.cached_dataset(model, prepared.datasets[name], accelerator)
        accelerator.print(f"feature cache: {note}")
    return feature_cache.FeatureCollator()
