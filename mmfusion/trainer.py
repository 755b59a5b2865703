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
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from .card import model_card
from .config import Config, from_dict
from .errors import CheckpointWriteError, InputError
from .evaluation import CONDITIONS, evaluate
from .files import atomic_directory
from .hub import resolve_checkpoint
from .model import FusionModel, load_compatible, read_model_config, reuse_tasks
from .options import load_yaml, save_yaml
from .prepare import Prepared, build_splits
from .processing import FusionProcessor
from .rows import loader_workers, make_loader, model_inputs
from .runlog import RUN_CONFIG_NAME, MetricsLog, available_metrics, metrics_line, selection_value
from .training import (
    StepPlan,
    StopSignal,
    TimeBudget,
    TrainerState,
    aux_scale,
    build_optimizer,
    build_scheduler,
    load_training_state,
    resolve_resume,
    save_training_state,
    seed_step,
    set_cpu_threads,
)
from .weighting import average_gradients, build_weighting, ddp_sync_disabled, weighted_backward


@dataclass
class Run:
    """What `train` returns: where the run's files are, and its metrics."""

    output_dir: Path
    best: Path | None  # best/ checkpoint (None before the first evaluation)
    final: Path | None  # final/ checkpoint (None when stopped by a signal)
    best_step: int | None
    validation: dict | None  # validation metrics of best/
    test: dict | None  # test metrics of best/ (None without a test split)
    steps: int
    stopped_by: str | None  # "signal", "early_stopping", "time_limit" or None


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

    # ---- data, then the configuration it resolves: tasks, label maps, vocabulary (or a checkpoint's)
    init = resolve_checkpoint(cfg.init_from) if cfg.init_from else None
    prepared = build_splits(config, FusionProcessor.from_pretrained(init) if init else None, source=data)
    for note in prepared.notes:
        log(f"tasks: {note}")
    log(f"data: {prepared.report.summary()}")
    config = resolve_config(config, prepared, init)

    # ---- model, weighting, optimizer, schedule, loaders
    model = FusionModel(config.model_config())
    if init:
        log(load_compatible(model, init))
    weighting = build_weighting(cfg.loss_weighting, config.tasks, cfg.seed)
    optimizer = build_optimizer(model, cfg, weighting.parameters())
    loop = Loop(config, accelerator, prepared, MetricsLog(output_dir, start, accelerator.is_main_process))
    scheduler = build_scheduler(optimizer, cfg, loop.plan)
    model, optimizer, loop.train_loader, loop.val_loader, scheduler = accelerator.prepare(
        model, optimizer, loop.train_loader, loop.val_loader, scheduler
    )
    weighting.to(accelerator.device)
    loop.model, loop.weighting = model, weighting
    log(loop.describe())

    # ---- outputs and resume
    checkpoint = resolve_resume(cfg.resume, output_dir) if cfg.resume else None
    if checkpoint:
        loop.state = load_training_state(accelerator, checkpoint, weighting)
        loop.plan.total = loop.state.total_steps or loop.plan.total
        log(f"resumed from {checkpoint} at step {loop.state.step}")
    elif cfg.resume:
        log(f"--train.resume latest: no checkpoint under {output_dir / 'checkpoints'} yet, starting from scratch")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, output_dir / RUN_CONFIG_NAME)
    accelerator.init_trackers("mmfusion", config=_flat(config.to_dict()))

    # ---- the loop
    state, unwrapped = loop.state, accelerator.unwrap_model(model)
    loop.first_step, loop.loop_started = state.step, time.perf_counter()
    with StopSignal() as stop:
        loop.progress = tqdm(total=loop.plan.total, initial=state.step, disable=not accelerator.is_local_main_process)
        while not loop.done:
            loop.start_epoch()
            for batch in loop.batches():
                seed_step(cfg.seed, state.epoch, state.batches_in_epoch, accelerator.process_index)
                unwrapped.aux_scale = aux_scale(cfg.aux_schedule, state.step, loop.plan.total)
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
        _finish_trackers(accelerator)
        return loop.result(None, None)
    return loop.finish()


def _as_config(config: Config | dict | str | Path) -> Config:
    """A Config from a Config, a dict of plain values, or a YAML file."""
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_dict(Config, config, where="config")
    return load_yaml(config)


def resolve_config(config: Config, prepared: Prepared, init: Path | None) -> Config:
    """The run's configuration with what the data decided (tasks with label maps and statistics, vocabulary
    size, longest text) and, with init_from, the pretrained checkpoint's architecture; written to config.yaml."""
    model = config.model
    tasks = prepared.tasks
    if init:
        source = read_model_config(init)
        model, tasks = dataclasses.replace(source, tasks=[]), reuse_tasks(tasks, source.tasks)
    model = dataclasses.replace(model, **prepared.model_settings)
    return dataclasses.replace(config, model=model, tasks=tasks)


class Loop:
    """The training loop's state and its bookkeeping between optimizer steps: logging, evaluating (best/), saving
    the training state, the time budget, early stopping, signals; and the end of the run."""

    def __init__(self, config: Config, accelerator: Accelerator, prepared: Prepared, metrics: MetricsLog) -> None:
        self.config, self.cfg, self.accelerator = config, config.train, accelerator
        self.prepared, self.metrics, self.log = prepared, metrics, accelerator.print
        self.output_dir = Path(self.cfg.output_dir)
        self.condition = "both" if self.cfg.without == "none" else f"without_{self.cfg.without}"
        self.train_set, self.val_set = prepared.datasets["train"], prepared.datasets["validation"]
        self.streaming = isinstance(self.train_set, torch.utils.data.IterableDataset)
        if self.streaming and not self.cfg.max_steps:
            raise InputError("--data.streaming true: a stream has no length, so give --train.max_steps")
        pad_id, workers = prepared.processor.settings.pad_id, loader_workers(config.data, accelerator)
        self.train_loader = make_loader(self.train_set, self.cfg.batch_size, pad_id, True, workers)
        self.val_loader = make_loader(self.val_set, self.cfg.eval_batch_size, pad_id, False, workers)
        self.epoch_batches = None if self.streaming else math.ceil(len(self.train_loader) / accelerator.num_processes)
        self.plan = StepPlan(self.planned_steps())
        self.budget = TimeBudget(self.cfg.time_limit, metrics.start) if self.cfg.time_limit else None
        self.state = TrainerState()
        self.model = self.weighting = self.progress = None
        self.running, self.running_batches = 0, 0  # summed losses (tasks, then total) since the last log
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        self.last_checked = self.last_evaluated = self.first_step = 0
        self.loop_started = self.warmup_started = time.perf_counter()
        self.stopped_by: str | None = None
        self.evaluation_seconds = 0.0

    # ----- planning -----

    def planned_steps(self) -> int:
        """max_steps, else epochs x optimizer steps per epoch; with a time limit a provisional upper bound."""
        if self.cfg.max_steps:
            return self.cfg.max_steps
        per_epoch = math.ceil(self.epoch_batches / self.cfg.grad_accumulation)
        return (1000 if self.cfg.time_limit else self.cfg.epochs) * per_epoch

    def evaluations(self, steps: int) -> int:
        """How many evaluations a run of `steps` steps makes (each epoch's, or every eval_every steps, and the last)."""
        if self.cfg.eval_every:
            return steps // self.cfg.eval_every + 1
        if self.epoch_batches is None:
            return 1
        return math.ceil(steps / math.ceil(self.epoch_batches / self.cfg.grad_accumulation))

    def plan_to_budget(self, step_seconds: float) -> None:
        """Time one evaluation, then set the planned steps so the rest of the run fits the time limit."""
        started = time.perf_counter()
        self.evaluate_and_keep_best()
        self.evaluation_seconds = time.perf_counter() - started
        rows = {name: len(d) for name, d in self.prepared.datasets.items() if hasattr(d, "__len__")}
        test_share = rows.get("test", 0) / max(1, rows.get("validation", 1))
        report = REPORT_PASSES * self.evaluation_seconds + REPORT_SECONDS if self.cfg.report else 0.0
        end = (1 + test_share) * self.evaluation_seconds + report
        total = self.budget.plan(step_seconds, self.evaluation_seconds, self.evaluations, end, self.state.step)
        self.plan.total = min(total, self.cfg.max_steps or total)
        self.state.total_steps = self.plan.total
        self.progress.total = self.plan.total
        self.metrics.write(
            {
                "step": self.state.step,
                "epoch": self.state.epoch,
                "split": "event",
                "event": "time_limit_plan",
                "planned_steps": self.plan.total,
                "step_seconds": step_seconds,
                "evaluation_seconds": self.evaluation_seconds,
                "end_seconds": end,
            }
        )
        self.log(
            f"time limit {self.cfg.time_limit:g}s: {step_seconds:.3f}s per step, {self.evaluation_seconds:.1f}s "
            f"per evaluation -> {self.plan.total} steps"
        )

    # ----- per batch -----

    @property
    def done(self) -> bool:
        return self.stopped_by is not None or self.state.step >= self.plan.total

    def start_epoch(self) -> None:
        self.train_loader.set_epoch(self.state.epoch)
        self.train_set.set_epoch(self.state.epoch)

    def batches(self):
        """This epoch's batches, past those a resumed run already consumed."""
        if self.state.batches_in_epoch:
            return self.accelerator.skip_first_batches(self.train_loader, self.state.batches_in_epoch)
        return self.train_loader

    def check_loss(self, loss: torch.Tensor, out, batch: dict) -> None:
        """Flag a non-finite loss (a device flag: no host sync per step); on CPU stop at once, naming the batch."""
        if self.accelerator.mixed_precision != "fp16":  # fp16: the loss scaler skips such steps itself
            self.bad_loss = self.bad_loss | ~torch.isfinite(loss.detach())
        if self.accelerator.device.type == "cpu" and self.bad_loss:  # reading it is free on CPU
            sources = "; ".join(self.train_set.describe(row) for row in batch["row"].tolist())
            self.stop_non_finite(f"at step {self.state.step + 1} (epoch {self.state.epoch})", out, sources)

    def add_losses(self, out, loss: torch.Tensor) -> None:
        self.running = self.running + torch.stack([*out.task_losses.values(), loss]).detach().float()  # no sync
        self.running_batches += 1

    def end_epoch(self) -> None:
        if self.state.batches_in_epoch:
            self.state.epoch, self.state.batches_in_epoch = self.state.epoch + 1, 0

    # ----- per optimizer step -----

    def after_step(self, out, scheduler, signal_received: int | None) -> None:
        """Count the step, then log, evaluate, save and decide whether to stop, as the options say."""
        state, cfg = self.state, self.cfg
        state.step += 1
        state.skipped_steps += int(self.accelerator.optimizer_step_was_skipped)
        self.progress.update(1)
        if self.budget and state.total_steps is None:
            self.time_warmup()
        end_of_epoch = state.batches_in_epoch == self.epoch_batches
        if self.budget and self.budget.must_stop(self.evaluation_seconds) and not self.done:
            self.stop("time_limit")
        finishing = self.done
        log_now = state.step % cfg.log_every == 0 or finishing
        evaluate_now = finishing or (state.step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch)
        save_now = state.step % cfg.save_every == 0 if cfg.save_every else end_of_epoch
        if log_now or evaluate_now or save_now:  # the loop's sync points: on GPU the flag is read only here
            if self.bad_loss:
                self.stop_non_finite(f"between steps {self.last_checked + 1} and {state.step}", out)
            self.last_checked = state.step
        if log_now:
            self.log_losses(out, scheduler)
        if evaluate_now and self.last_evaluated != state.step:
            self.evaluate_and_keep_best()
        if end_of_epoch:
            self.weighting.end_epoch(self.accelerator)
            self.end_epoch()
        if save_now or signal_received is not None:
            self.save_state()
        if signal_received is not None:
            self.stopped_by = "signal"

    def time_warmup(self) -> None:
        """Measure `warmup_steps` steps after the first two (which pay for caches), then plan to the budget."""
        measured = self.state.step - 2
        if measured == 0:
            self.warmup_started = time.perf_counter()
        elif measured == self.budget.warmup_steps:
            self.plan_to_budget((time.perf_counter() - self.warmup_started) / measured)

    def stop(self, reason: str) -> None:
        self.stopped_by = reason
        self.metrics.write(
            {
                "step": self.state.step,
                "epoch": self.state.epoch,
                "split": "event",
                "event": reason,
                "best_step": self.state.best_step,
            }
        )
        self.log(f"stopping at step {self.state.step}: {reason.replace('_', ' ')}")

    def log_losses(self, out, scheduler) -> None:
        state, cfg = self.state, self.cfg
        mean = self.accelerator.reduce(self.running / self.running_batches, "mean").tolist()
        logged = dict(zip([*out.task_losses, "loss"], mean))
        lr = scheduler.get_last_lr()[-1]
        record = {
            "step": state.step,
            "epoch": state.epoch,
            "split": "train",
            "losses": logged,
            "lr": lr,
            "pairs_per_s": None,
            "weights": self.weighting.last_weights(),
        }
        pairs = (state.step - self.first_step) * cfg.batch_size * cfg.grad_accumulation * self.accelerator.num_processes
        record["pairs_per_s"] = pairs / max(1e-9, time.perf_counter() - self.loop_started)
        self.progress.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{lr:.2e}", pairs_s=f"{record['pairs_per_s']:.0f}")
        self.metrics.write(record)
        self.accelerator.log(
            _flat({"train": {**logged, "lr": lr, "pairs_per_s": record["pairs_per_s"]}}), step=state.step
        )
        self.running, self.running_batches = 0, 0

    def evaluate_and_keep_best(self) -> dict:
        """Evaluate on validation; save best/ when the best metric improves; count evaluations for early stopping."""
        state = self.state
        self.last_evaluated = state.step
        metrics = evaluate(self.model, self.val_loader, self.accelerator, self.config.tasks, (self.condition,))
        metrics = metrics[self.condition].compute()
        self.metrics.write({"step": state.step, "epoch": state.epoch, "split": "validation", **metrics})
        self.accelerator.log(_flat({"validation": metrics}), step=state.step)
        value = selection_value(metrics, self.cfg.best_metric)
        if value is None:
            raise InputError(
                f"--train.best_metric {self.cfg.best_metric!r} not found; available: {available_metrics(metrics)}"
            )
        improved = state.best_value is None or value > state.best_value
        if improved:
            state.best_value, state.best_step, state.best_metrics = value, state.step, metrics
            state.evaluations_since_best = 0
            self.save_checkpoint("best")
        else:
            state.evaluations_since_best += 1
        state.last_metrics = metrics
        self.log(f"step {state.step} validation: {metrics_line(metrics)}{'  (best)' if improved else ''}")
        patience = self.cfg.early_stopping_patience
        if patience and state.evaluations_since_best >= patience and not self.done:
            self.stop("early_stopping")
        return metrics

    # ----- checkpoints and stops -----

    def save_checkpoint(self, name: str) -> Path:
        """best/ or final/: the model and its processor, as `from_pretrained` loads them (atomically)."""
        directory = self.output_dir / name
        if self.accelerator.is_main_process:
            try:
                with atomic_directory(directory) as staging:
                    self.accelerator.unwrap_model(self.model).save_pretrained(staging)
                    self.prepared.processor.save_pretrained(staging)
            except OSError as error:
                kept = "the previous one is intact" if directory.exists() else "nothing was written"
                raise CheckpointWriteError(f"writing {directory} failed ({error}); {kept}") from None
        self.accelerator.wait_for_everyone()
        return directory

    def save_state(self) -> None:
        """Save the training state, unless the weights are no longer finite (then the last good one must stay)."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FloatingPointError(f"non-finite weights at step {self.state.step}; the training state was not saved")
        self.state.total_steps = self.state.total_steps or self.plan.total
        save_training_state(self.accelerator, self.output_dir, self.state, self.cfg.keep_checkpoints, self.weighting)

    def stop_non_finite(self, when: str, out, sources: str | None = None) -> None:
        losses = {k: float(v.detach()) for k, v in out.task_losses.items()}
        batch = f"; batch: {sources}" if sources else ""
        raise FloatingPointError(
            f"non-finite loss {when}; last task losses {losses}{batch}. "
            f"Training stopped; the last good checkpoint is in {self.output_dir / 'checkpoints'}"
        )

    # ----- the end -----

    def describe(self) -> str:
        unwrapped = self.accelerator.unwrap_model(self.model) if self.model is not None else None
        sizes = "a stream of" if self.streaming else f"{len(self.train_set):,}"
        validation = "a stream of" if self.streaming else f"{len(self.val_set):,}"
        pairs = self.cfg.batch_size * self.accelerator.num_processes * self.cfg.grad_accumulation
        steps = f"{self.plan.total} steps" if not self.budget else f"steps planned to {self.cfg.time_limit:g}s"
        parameters = (
            f"{unwrapped.num_parameters():,} parameters ({unwrapped.num_parameters(trainable_only=True):,} trainable)"
        )
        return f"model: {parameters}; data: {sizes} train / {validation} validation pairs; {steps} of {pairs} pairs"

    def finish(self) -> Run:
        """final/, the best checkpoint on the test split, model cards, the report, and where everything is."""
        accelerator, state = self.accelerator, self.state
        final = self.save_checkpoint("final")
        best = self.output_dir / "best"
        test = self.evaluate_test(best) if "test" in self.prepared.datasets else None
        if accelerator.is_main_process:
            sizes = {name: len(d) for name, d in self.prepared.datasets.items() if hasattr(d, "__len__")}
            for name, validation, test_metrics in ((best, state.best_metrics, test), (final, state.last_metrics, None)):
                if name.is_dir():
                    (name / "README.md").write_text(model_card(self.config, sizes, validation, test_metrics))
        if self.cfg.report and accelerator.is_main_process:
            from .report import write_report

            self.log(f"report: {write_report(self.output_dir, validation=self.val_set)}")
        self.log(
            f"done in {self.metrics.elapsed():.0f}s: best checkpoint {best} (step {state.best_step}), final {final}, "
            f"metrics in {self.metrics.path}\n"
            f"evaluate with: mmfusion evaluate {best} --data.path {self.config.data.path} --split test"
        )
        accelerator.wait_for_everyone()
        _finish_trackers(accelerator)
        return self.result(final, test)

    def evaluate_test(self, best: Path) -> dict:
        """The best checkpoint's metrics on the test split, logged and written to test_metrics.json."""
        model = FusionModel.from_pretrained(best) if best.is_dir() else self.accelerator.unwrap_model(self.model)
        pad_id = self.prepared.processor.settings.pad_id
        loader = make_loader(self.prepared.datasets["test"], self.cfg.eval_batch_size, pad_id, False, 0)
        loader, model = self.accelerator.prepare(loader, model.to(self.accelerator.device))
        metrics = evaluate(model, loader, self.accelerator, self.config.tasks, (self.condition,))
        metrics = metrics[self.condition].compute()
        self.metrics.write(
            {"step": self.state.step, "epoch": self.state.epoch, "split": "test", "checkpoint": "best", **metrics}
        )
        if self.accelerator.is_main_process:
            (self.output_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        self.log(f"test (best checkpoint): {metrics_line(metrics)}")
        return metrics

    def result(self, final: Path | None, test: dict | None) -> Run:
        best = self.output_dir / "best"
        return Run(
            self.output_dir,
            best if best.is_dir() else None,
            final,
            self.state.best_step,
            self.state.best_metrics,
            test,
            self.state.step,
            self.stopped_by,
        )


REPORT_PASSES = 6
"""The report re-evaluates the validation split about this many times (four modality conditions, errors, maps)."""
REPORT_SECONDS = 8.0
"""And spends about this long drawing figures and writing the page (benchmarks/time_limit.py measures both)."""


def _finish_trackers(accelerator: Accelerator) -> None:
    """What `end_training` does but destroying the process group, so train() can run again in the same processes."""
    for tracker in accelerator.trackers:
        tracker.finish()


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested metrics as {"a/b": value}, for trackers."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, name + "/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
