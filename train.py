"""Fine-tune a multimodal fusion model with accelerate.

    accelerate launch train.py                                        # the bundled sample data
    accelerate launch train.py --config configs/x.yaml --model.fusion gated --train.lr 3e-4
    accelerate launch --mixed_precision bf16 train.py --data.path my_data/ --train.output_dir runs/mine

`python train.py --help` lists every option. Outputs go to --train.output_dir: config.yaml, metrics.jsonl,
checkpoints/step_N/ (training state for --train.resume), best/ and final/ (from_pretrained directories).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from mmfusion.config import Config, parse_args, save_yaml

if __name__ == "__main__":
    parse_args()  # --help and bad options are answered here, before torch and the trainer are imported (fast)

import torch  # noqa: E402
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from mmfusion.card import model_card
from mmfusion.data import model_inputs
from mmfusion.errors import CheckpointWriteError, InputError
from mmfusion.evaluation import evaluate
from mmfusion.hub import resolve_checkpoint
from mmfusion.losses import build_weighting
from mmfusion.metrics import LOWER_IS_BETTER
from mmfusion.model import FusionModel, atomic_directory, load_compatible, read_config
from mmfusion.processing import FusionProcessor
from mmfusion.report import write_report
from mmfusion.training import (
    StopSignal,
    TrainerState,
    aux_scale,
    average_gradients,
    build_optimizer,
    build_scheduler,
    ddp_sync_disabled,
    load_training_state,
    loader_workers,
    make_loader,
    prepare_data,
    resolve_resume,
    save_training_state,
    seed_step,
    set_cpu_threads,
    weighted_backward,
)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        return train(config)
    except InputError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except (FloatingPointError, CheckpointWriteError) as error:
        print(f"train.py: stopped: {error}", file=sys.stderr)
        return 1


def train(config: Config) -> int:
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
    stop = StopSignal()
    ablate = None if cfg.ablate == "none" else cfg.ablate
    set_seed(cfg.seed)  # model initialisation and the data order
    set_cpu_threads(accelerator, cfg.cpu_threads)

    # ---- data: tasks, label maps and tokenizer come from the training split (or the checkpoint we start from)
    init = resolve_checkpoint(cfg.init_from) if cfg.init_from else None
    processor = FusionProcessor.from_pretrained(init) if init else None
    data = prepare_data(config, processor)
    config.tasks = data.tasks
    for note in data.notes:
        log(f"tasks: {note}")
    log(f"data: {data.report.summary()}")
    train_set, val_set = data.datasets["train"], data.datasets["validation"]
    pad_id = data.processor.settings.pad_id
    workers = loader_workers(config.data, accelerator)
    train_loader = make_loader(train_set, cfg.batch_size, pad_id, True, workers)
    val_loader = make_loader(val_set, cfg.eval_batch_size, pad_id, False, workers)

    # ---- model: fresh, or the compatible parts of a pretrained fusion checkpoint
    if init:
        config.model = read_config(init)
    config.model.tasks = data.tasks
    model = FusionModel(config.model)
    if init:
        log(load_compatible(model, init))
    weighting = build_weighting(cfg.loss_weighting, data.tasks, cfg.seed)
    optimizer = build_optimizer(model, cfg, weighting.parameters())
    streaming = isinstance(train_set, torch.utils.data.IterableDataset)
    if streaming and not cfg.max_steps:
        raise InputError("--data.streaming true: a stream has no length, so give --train.max_steps")
    epoch_batches = None if streaming else math.ceil(len(train_loader) / accelerator.num_processes)
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(epoch_batches / cfg.grad_accumulation)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    weighting.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    log(
        f"model: {unwrapped.num_parameters():,} parameters ({unwrapped.num_parameters(trainable_only=True):,} "
        f"trainable); data: {'a stream of' if streaming else f'{len(train_set):,}'} train / "
        f"{'a stream of' if streaming else f'{len(val_set):,}'} validation pairs; "
        f"{total_steps} steps of {cfg.batch_size * accelerator.num_processes * cfg.grad_accumulation} pairs"
    )

    # ---- outputs and resume
    state = TrainerState()
    checkpoint = resolve_resume(cfg.resume, output_dir) if cfg.resume else None
    if checkpoint:
        state = load_training_state(accelerator, checkpoint)
        weighting.load(checkpoint)
        log(f"resumed from {checkpoint} at step {state.step}")
    elif cfg.resume:
        log(f"--train.resume latest: no checkpoint under {output_dir / 'checkpoints'} yet, starting from scratch")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, output_dir / "config.yaml")
    accelerator.init_trackers("mmfusion", config=_flat(config.to_dict()))
    start_time = time.perf_counter()
    metrics_file = output_dir / "metrics.jsonl"

    def record(values: dict) -> None:
        values["elapsed_s"] = round(time.perf_counter() - start_time, 3)
        if accelerator.is_main_process:
            with metrics_file.open("a") as f:
                f.write(json.dumps(values) + "\n")

    def save_pretrained(name: str) -> Path:
        directory = output_dir / name
        if accelerator.is_main_process:
            try:
                with atomic_directory(directory) as staging:
                    accelerator.unwrap_model(model).save_pretrained(staging)
                    data.processor.save_pretrained(staging)
            except OSError as error:
                kept = "the previous one is intact" if directory.exists() else "nothing was written"
                raise CheckpointWriteError(f"writing {directory} failed ({error}); {kept}") from None
        accelerator.wait_for_everyone()
        return directory

    def run_evaluation(epoch: int) -> dict:
        metrics = evaluate(model, val_loader, accelerator, data.tasks, remove=ablate)
        record({"step": state.step, "epoch": epoch, "split": "validation", **metrics})
        accelerator.log(_flat({"validation": metrics}), step=state.step)
        value = _best_value(metrics, cfg.best_metric)
        improved = state.best_value is None or value > state.best_value
        if improved:
            state.best_value, state.best_step, state.best_metrics = value, state.step, metrics
            save_pretrained("best")
        state.last_metrics = metrics
        log(f"step {state.step} validation: {_one_line(metrics)}{'  (best)' if improved else ''}")
        return metrics

    # ---- the loop
    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process)
    start_step, running, running_batches = state.step, 0, 0  # summed losses (tasks, then total) since the last log
    bad_loss, last_checked = torch.zeros((), dtype=torch.bool, device=accelerator.device), state.step
    epoch = state.epoch
    done = state.step >= total_steps
    while not done:
        train_loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        batches = train_loader
        if state.batches_in_epoch:
            batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        for batch in batches:
            seed_step(cfg.seed, epoch, state.batches_in_epoch, accelerator.process_index)
            unwrapped.aux_scale = aux_scale(cfg.aux_schedule, state.step, total_steps)
            state.batches_in_epoch += 1
            with accelerator.accumulate(model), ddp_sync_disabled(accelerator, model, weighting):
                out = model(**model_inputs(batch, ablate), labels=batch["labels"], label_mask=batch["label_mask"])
                present = torch.stack([batch["label_mask"][name].any() for name in weighting.names])
                loss = weighted_backward(accelerator, model, weighting, out, present, state.step)
                if accelerator.mixed_precision != "fp16":  # fp16: the loss scaler skips such steps itself
                    bad_loss = bad_loss | ~torch.isfinite(loss.detach())  # a device flag: no host sync per step
                if accelerator.device.type == "cpu" and bad_loss:  # reading it is free on CPU, and names the batch
                    sources = "; ".join(train_set.describe(row) for row in batch["row"].tolist())
                    _stop_non_finite(f"at step {state.step + 1} (epoch {epoch})", out, output_dir, sources)
                if accelerator.sync_gradients:
                    average_gradients(accelerator, model, weighting)
                    if cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()  # a no-op while accumulating
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running = running + torch.stack([*out.task_losses.values(), loss]).detach().float()  # one op, no sync
            running_batches += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            state.skipped_steps += int(accelerator.optimizer_step_was_skipped)
            progress.update(1)
            end_of_epoch = state.batches_in_epoch == epoch_batches
            done = state.step >= total_steps
            log_now = state.step % cfg.log_every == 0 or done
            evaluate_now = done or (state.step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch)
            save_now = state.step % cfg.save_every == 0 if cfg.save_every else end_of_epoch
            if log_now or evaluate_now or save_now:  # the loop's sync points: on GPU the flag is read only here
                if bad_loss:
                    _stop_non_finite(f"between steps {last_checked + 1} and {state.step}", out, output_dir)
                last_checked = state.step
            if log_now:
                mean = accelerator.reduce(running / running_batches, "mean").tolist()
                logged = dict(zip([*out.task_losses, "loss"], mean))
                pairs = (state.step - start_step) * cfg.batch_size * cfg.grad_accumulation * accelerator.num_processes
                speed = pairs / (time.perf_counter() - start_time)
                lr = scheduler.get_last_lr()[-1]
                progress.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{lr:.2e}", pairs_s=f"{speed:.0f}")
                record({"step": state.step, "epoch": epoch, "split": "train", "losses": logged, "lr": lr,
                        "pairs_per_s": speed, "weights": weighting.last_weights()})  # fmt: skip
                accelerator.log(_flat({"train": {**logged, "lr": lr, "pairs_per_s": speed}}), step=state.step)
                running, running_batches = 0, 0
            if evaluate_now:
                run_evaluation(epoch)
            if end_of_epoch:
                weighting.end_epoch(accelerator)
                epoch, state.epoch, state.batches_in_epoch = epoch + 1, epoch + 1, 0
            if save_now:
                _save_state(accelerator, model, output_dir, state, cfg, weighting)
            if stop.received is not None:
                _save_state(accelerator, model, output_dir, state, cfg, weighting)
                log(f"received signal {stop.received}: saved the training state at step {state.step}; resume with "
                    f"--train.resume latest")  # fmt: skip
                accelerator.end_training()
                return 0
            if done:
                break
        else:  # the loader ran out (a stream, or the last partial accumulation)
            if state.batches_in_epoch:
                epoch, state.epoch, state.batches_in_epoch = epoch + 1, epoch + 1, 0
    progress.close()

    # ---- the end: final weights, test report, where everything is
    final = save_pretrained("final")
    test_metrics = None
    if "test" in data.datasets:
        best = FusionModel.from_pretrained(output_dir / "best") if (output_dir / "best").is_dir() else unwrapped
        test_loader = accelerator.prepare(make_loader(data.datasets["test"], cfg.eval_batch_size, pad_id, False, 0))
        best = accelerator.prepare(best.to(accelerator.device))
        metrics = evaluate(best, test_loader, accelerator, data.tasks, remove=ablate)
        record({"step": state.step, "epoch": epoch, "split": "test", "checkpoint": "best", **metrics})
        if accelerator.is_main_process:
            (output_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
        log(f"test (best checkpoint): {_one_line(metrics)}")
        test_metrics = metrics
    if accelerator.is_main_process:
        sizes = {name: len(dataset) for name, dataset in data.datasets.items() if hasattr(dataset, "__len__")}
        for name, validation, test in (("best", state.best_metrics, test_metrics), ("final", state.last_metrics, None)):
            if (output_dir / name).is_dir():
                (output_dir / name / "README.md").write_text(model_card(config, sizes, validation, test))
    if cfg.report and accelerator.is_main_process:
        log(f"report: {write_report(output_dir)}")
    log(
        f"done in {time.perf_counter() - start_time:.0f}s: best checkpoint {output_dir / 'best'} "
        f"(step {state.best_step}), final {final}, metrics in {metrics_file}\n"
        f"evaluate with: mmfusion evaluate {output_dir / 'best'} --data.path {config.data.path} --split test"
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _save_state(accelerator, model, output_dir: Path, state: TrainerState, cfg, weighting) -> None:
    """Save the training state, unless the weights are no longer finite (then the last good one must stay)."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise FloatingPointError(f"non-finite weights at step {state.step}; the training state was not saved")
    directory = save_training_state(accelerator, output_dir, state, cfg.keep_checkpoints)
    if accelerator.is_main_process:
        weighting.save(directory)


def _stop_non_finite(when: str, out, output_dir: Path, sources: str | None = None) -> None:
    losses = {k: float(v.detach()) for k, v in out.task_losses.items()}
    batch = f"; batch: {sources}" if sources else ""
    raise FloatingPointError(
        f"non-finite loss {when}; last task losses {losses}{batch}. "
        f"Training stopped; the last good checkpoint is in {output_dir / 'checkpoints'}"
    )


def _best_value(metrics: dict, name: str) -> float:
    """`summary`, or `task/metric`; lower-is-better metrics are negated so that larger is always better."""
    if name == "summary":
        return metrics["summary"]
    task, _, metric = name.partition("/")
    value = metrics.get(task, {}).get(metric)
    if value is None:
        raise InputError(f"--train.best_metric {name!r} not found; available: {sorted(_flat(metrics))}")
    return -value if metric in LOWER_IS_BETTER else value


def _one_line(metrics: dict) -> str:
    parts = [f"summary {metrics['summary']:.3f}"]
    for task, values in metrics.items():
        if isinstance(values, dict):
            shown = [f"{k} {v:.3f}" for k, v in values.items() if k != "count" and isinstance(v, float)][:3]
            parts.append(f"{task}: {', '.join(shown)}")
    return " | ".join(parts)


def _flat(values: dict, prefix: str = "") -> dict:
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


if __name__ == "__main__":
    sys.exit(main())
