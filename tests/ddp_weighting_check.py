"""Run by test_weighting.py under two processes: each gradient-based weighting must give the same task weights
and the same parameter update on both processes, though each process sees different samples."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from helpers import tiny_batch, tiny_config

from mmfusion import FusionModel
from mmfusion.config import TrainConfig
from mmfusion.training import build_optimizer
from mmfusion.weighting import average_gradients, build_weighting, ddp_sync_disabled, weighted_backward


def check(name: str, accelerator: Accelerator) -> None:
    torch.manual_seed(0)
    model = FusionModel(tiny_config("simple_cnn", "gru", "concat"))
    weighting = build_weighting(name, model.config.tasks, nll_noise_decay=0.9).to(accelerator.device)
    optimizer = build_optimizer(model, TrainConfig(lr=0.01), weighting.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = tiny_batch(seed=accelerator.process_index)  # different samples on each process
    if accelerator.process_index == 1:
        batch["labels"]["topic"] = torch.full((4,), -1)  # a task with labels on one process only
    for step in range(2):
        with ddp_sync_disabled(accelerator, model, weighting):
            out = model(**batch)
            present = torch.stack([out.task_losses[n].detach() != 0 for n in weighting.names])
            weighted_backward(accelerator, model, weighting, out, present, step)
        average_gradients(accelerator, model, weighting)
        optimizer.step()
        optimizer.zero_grad()
    if weighting.needs_gradients:
        weights = accelerator.gather(weighting.current)
    else:  # the state the weights come from: learned log-variances, or nll's running noise of each task
        weights = accelerator.gather(weighting.noise if name == "nll" else weighting.log_variance.detach())
    parameters = torch.cat(
        [p.detach().flatten() for p in model.parameters()] + [p.detach().flatten() for p in weighting.parameters()]
    )
    gathered = accelerator.gather(parameters[None])
    half = len(weights) // 2
    assert torch.equal(weights[:half], weights[half:]), (name, weights)
    assert torch.equal(gathered[0], gathered[1]), name
    accelerator.print(f"{name}: same weights and update on both processes")


if __name__ == "__main__":
    accelerator = Accelerator()
    for name in ("pcgrad", "mgda", "cagrad", "gradnorm", "uncertainty", "nll"):
        check(name, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    sys.exit(0)
