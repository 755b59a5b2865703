"""The training loop's bookkeeping between optimizer steps (`Loop`): logging, evaluating and keeping best/, saving
the training state, fitting a time budget, early stopping, signals, and the end of the run (final/, the test
split, model cards, the report). `trainer.train` drives it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from .card import model_card
from .config import Config
from .device_decode import DeviceDecoder
from .errors import CheckpointWriteError, InputError
from .evaluation import evaluate
from .files import atomic_directory
from .model import FusionModel
from .prepare import Prepared
from .rows import loader_workers, make_loader
from .runlog import MetricsLog, available_metrics, metrics_line, selection_value
from .streams import resume_stream, stream_batches, stream_positions
from .training import StepPlan, TimeBudget, TrainerState, save_training_state


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


REPORT_PASSES = 1.5
"""The report's re-evaluation of the validation split (four modality conditions in one pass over the data, then
the errors and maps) costs about this many validation evaluations of training..."""
REPORT_SECONDS = 5.0
"""...plus about this long for figures and the page (measured on benchmarks/suite clutter: 35 s against a 22.8 s
evaluation; benchmarks/time_limit.py measures whole runs)."""


class Loop:
    """The training loop's state and its bookkeeping between optimizer steps: logging, evaluating (best/), saving
    the training state, the time budget, early stopping, signals; and the end of the run."""

    def __init__(
        self, config: Config, accelerator: Accelerator, prepared: Prepared, metrics: MetricsLog, collate=None
    ) -> None:
        self.config, self.cfg, self.accelerator = config, config.train, accelerator
        self.prepared, self.metrics, self.log = prepared, metrics, accelerator.print
        self.output_dir = Path(self.cfg.output_dir)
        self.condition = "both" if self.cfg.without == "none" else f"without_{self.cfg.without}"
        self.train_set, self.val_set = prepared.datasets["train"], prepared.datasets["validation"]
        self.streaming = isinstance(self.train_set, torch.utils.data.IterableDataset)
        if self.streaming and not self.cfg.max_steps:
            raise InputError("--data.streaming true: a stream has no length, so give --train.max_steps")
        pad_id, workers = prepared.processor.settings.pad_id, loader_workers(config.data, accelerator)
        self.train_loader = make_loader(self.train_set, self.cfg.batch_size, pad_id, True, workers, collate)
        self.val_loader = make_loader(self.val_set, self.cfg.eval_batch_size, pad_id, False, workers, collate)
        self.epoch_batches = None if self.streaming else math.ceil(len(self.train_loader) / accelerator.num_processes)
        on_device = getattr(self.train_set, "on_device", False)  # --data.cache device
        self.decoder = DeviceDecoder(prepared.processor, accelerator.device) if on_device else None
        self.plan = StepPlan(self.planned_steps())
        self.budget = TimeBudget(self.cfg.time_limit, metrics.start) if self.cfg.time_limit else None
        self.state = TrainerState()
        self.model = self.weighting = self.progress = None
        self.running, self.running_batches = 0, 0  # summed losses (tasks, then total) since the last log
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        self.last_checked = self.last_evaluated = self.first_step = 0
        self.loop_started = self.warmup_started = time.perf_counter()
        self.paused = 0.0  # seconds spent evaluating and saving since the time budget's warm-up began
        self.stopped_by: str | None = None
        self.evaluation_seconds = 0.0

    # ----- planning -----

    def planned_steps(self) -> int:
        """max_steps, else epochs x optimizer steps per epoch; with a time limit a provisional upper bound."""
        if self.cfg.max_steps:
            return self.cfg.max_steps
        per_epoch = math.ceil(self.epoch_batches / self.cfg.grad_accumulation)
        return math.ceil((1000 if self.cfg.time_limit else self.cfg.epochs) * per_epoch)

    def evaluations(self, steps: int) -> int:
        """How many evaluations a run of `steps` steps makes (each epoch's, or every eval_every steps, and the last)."""
        if self.cfg.eval_every:
            return steps // self.cfg.eval_every + 1
        if self.epoch_batches is None:
            return 1
        return math.ceil(steps / math.ceil(self.epoch_batches / self.cfg.grad_accumulation))

    def replan(self) -> None:
        """Set the planned steps so the rest of the run fits the time limit, from the step time measured so far
        (evaluations and saves left out) and the last evaluation's time; first called after the warm-up, then
        after each evaluation, so a machine that slows down or speeds up still ends annealed and in time."""
        steps = self.state.step - self.budget.warmup_from
        step_seconds = (time.perf_counter() - self.warmup_started - self.paused) / max(1, steps)
        rows = {name: len(d) for name, d in self.prepared.datasets.items() if hasattr(d, "__len__")}
        test_share = rows.get("test", 0) / max(1, rows.get("validation", 1))
        report = REPORT_PASSES * self.evaluation_seconds + REPORT_SECONDS if self.cfg.report else 0.0
        end = (1 + test_share) * self.evaluation_seconds + report
        total = self.budget.plan(step_seconds, self.evaluation_seconds, self.evaluations, end, self.state.step)
        total = -self.most_over_processes(-total)  # every process plans from its own clock: the fewest steps hold
        first = self.state.total_steps is None
        self.plan.total = self.state.total_steps = min(total, self.cfg.max_steps or total)
        self.progress.total = self.plan.total
        event = {"planned_steps": self.plan.total, "step_seconds": step_seconds, "end_seconds": end}
        self.write_event("time_limit_plan", **event, evaluation_seconds=self.evaluation_seconds)
        if first:
            self.log(
                f"time limit {self.cfg.time_limit:g}s: {step_seconds:.3f}s per step, {self.evaluation_seconds:.1f}s "
                f"per evaluation -> {self.plan.total} steps (re-planned after each evaluation)"
            )

    # ----- per batch -----

    @property
    def done(self) -> bool:
        return self.stopped_by is not None or self.state.step >= self.plan.total

    def start_epoch(self) -> None:
        if not self.streaming:
            self.train_loader.set_epoch(self.state.epoch)
        self.train_set.set_epoch(self.state.epoch)

    def batches(self):
        """This epoch's batches, past those a resumed run already consumed (a stream starts at its saved position);
        with --data.cache device their images are decoded here, on the device."""
        if self.streaming:
            return stream_batches(self.train_loader, self.accelerator)
        loader = self.train_loader
        if self.state.batches_in_epoch:
            loader = self.accelerator.skip_first_batches(self.train_loader, self.state.batches_in_epoch)
        return loader if self.decoder is None else map(self.decoder, loader)

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
        if self.budget and self.any_process(self.budget.must_stop(self.evaluation_seconds)) and not self.done:
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
        """Measure `warmup_steps` steps after the first ones (which pay for caches), time one evaluation, then plan
        to the budget."""
        if self.state.step == self.budget.warmup_from:
            self.warmup_started, self.paused = time.perf_counter(), 0.0
        elif self.state.step == self.budget.warmup_from + self.budget.warmup_steps:
            self.evaluate_and_keep_best()  # timed; it re-plans

    def most_over_processes(self, value: int) -> int:
        """The largest of the processes' values (one small all-gather), so that they take the same decision."""
        if self.accelerator.num_processes == 1:
            return value
        return int(self.accelerator.gather(torch.tensor([value], device=self.accelerator.device)).max())

    def any_process(self, flag: bool) -> bool:
        return bool(self.most_over_processes(int(flag)))

    def write_event(self, event: str, **values) -> None:
        """An event of the run (planning, stopping) in metrics.jsonl."""
        self.metrics.write(
            {"step": self.state.step, "epoch": self.state.epoch, "split": "event", "event": event, **values}
        )

    def stop(self, reason: str) -> None:
        self.stopped_by = reason
        self.write_event(reason, best_step=self.state.best_step)
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
            flat_metrics({"train": {**logged, "lr": lr, "pairs_per_s": record["pairs_per_s"]}}), step=state.step
        )
        self.running, self.running_batches = 0, 0

    def evaluate_and_keep_best(self) -> dict:
        """Evaluate on validation; save best/ when the best metric improves; count evaluations for early stopping."""
        state, started = self.state, time.perf_counter()
        self.last_evaluated = state.step
        metrics = evaluate(self.model, self.val_loader, self.accelerator, self.config.tasks, (self.condition,))
        metrics = metrics[self.condition].compute()
        self.metrics.write({"step": state.step, "epoch": state.epoch, "split": "validation", **metrics})
        self.accelerator.log(flat_metrics({"validation": metrics}), step=state.step)
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
        self.evaluation_seconds = time.perf_counter() - started
        self.paused += self.evaluation_seconds
        if self.budget and self.state.step >= self.budget.warmup_from + self.budget.warmup_steps and not self.done:
            self.replan()
        return metrics

    # ----- checkpoints and stops -----

    def save_checkpoint(self, name: str) -> Path:
        """best/ or final/: the model and its processor, as `from_pretrained` loads them (atomically)."""
        directory = self.output_dir / name
        state = self.accelerator.get_state_dict(self.model)  # on every process: FSDP gathers its shards here
        if self.accelerator.is_main_process:
            try:
                with atomic_directory(directory) as staging:
                    self.accelerator.unwrap_model(self.model).save_pretrained(staging, state)
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
        if self.streaming:
            self.state.stream_rows = stream_positions(self.train_set)
        started = time.perf_counter()
        save_training_state(
            self.accelerator, self.output_dir, self.state, self.cfg.keep_checkpoints, self.weighting, self.model
        )
        self.paused += time.perf_counter() - started

    def resume_stream(self) -> None:
        """A training stream resumed mid-epoch starts at each process's saved position."""
        if self.streaming and self.state.batches_in_epoch:
            accelerator = self.accelerator
            resume_stream(self.train_set, self.state.stream_rows, accelerator.num_processes, accelerator.process_index)

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
        if not (self.budget or self.cfg.max_steps):
            steps += f" ({self.cfg.epochs:g} epochs)"
        parameters = (
            f"{unwrapped.num_parameters():,} parameters ({unwrapped.num_parameters(trainable_only=True):,} trainable)"
        )
        accelerator = self.accelerator
        precision = "" if accelerator.mixed_precision == "no" else f", {accelerator.mixed_precision}"
        processes = f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value.lower()}{precision}"
        data = f"{sizes} train / {validation} validation pairs"
        return f"model: {parameters}; data: {data}; {steps} of {pairs} pairs ({processes})"

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
        on_disk = Path(self.config.data.path).exists()  # not data passed in memory to mmfusion.train
        hint = f"mmfusion evaluate {best} --data.path {self.config.data.path} --split test" if on_disk else ""
        self.log(
            f"done in {self.metrics.elapsed():.0f}s: best checkpoint {best} (step {state.best_step}), final {final}, "
            f"metrics in {self.metrics.path}" + (f"\nevaluate with: {hint}" if hint else "")
        )
        accelerator.wait_for_everyone()
        finish_trackers(accelerator)
        return self.result(final, test)

    def evaluate_test(self, best: Path) -> dict:
        """The best checkpoint's metrics on the test split, logged and written to test_metrics.json."""
        model = FusionModel.from_pretrained(best) if best.is_dir() else self.accelerator.unwrap_model(self.model)
        pad_id = self.prepared.processor.settings.pad_id
        loader = self.accelerator.prepare(
            make_loader(self.prepared.datasets["test"], self.cfg.eval_batch_size, pad_id, False, 0)
        )
        model = model.to(self.accelerator.device)  # evaluation needs no DDP or FSDP wrapper (evaluate autocasts)
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


def finish_trackers(accelerator: Accelerator) -> None:
    """What `end_training` does but destroying the process group, so train() can run again in the same processes."""
    for tracker in accelerator.trackers:
        tracker.finish()


def flat_metrics(values: dict, prefix: str = "") -> dict:
    """Nested metrics as {"a/b": value}, for trackers."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_metrics(value, name + "/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
