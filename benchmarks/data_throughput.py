"""Is the data loader ever the bottleneck? Loader pairs/s with 0, 1, 2 (and 4 on GPU) workers beside the model's
training consumption of the same batches (forward, backward, optimizer step on pre-loaded batches on the device),
then train.py end to end with each worker count, which decides `--data.num_workers`'s default.

    python benchmarks/data_throughput.py [--batches 60] [--steps 60]

Writes benchmarks/results/data_throughput.json (data_throughput_gpu.json on a CUDA machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from accelerate.utils import send_to_device
from common import train_run, write_result

from mmfusion.config import Config
from mmfusion.model import FusionModel
from mmfusion.prepare import build_splits
from mmfusion.rows import make_loader, model_inputs
from mmfusion.training import build_optimizer

BATCH = 32


def loader_rate(data, workers: int, batches: int) -> float:
    loader = make_loader(data.datasets["train"], BATCH, data.processor.settings.pad_id, True, workers)
    iterator = iter(loader)
    next(iterator)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * BATCH / (time.perf_counter() - start)


def training_rate(config: Config, data, batches: int) -> float:
    loader = make_loader(data.datasets["train"], BATCH, data.processor.settings.pad_id, True, 0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cached = [send_to_device(batch, device) for batch, _ in zip(loader, range(batches + 5))]
    model = FusionModel(config.model).to(device).train()
    optimizer = build_optimizer(model, config.train)
    start = None
    for i, batch in enumerate(cached):
        if i == 5:
            start = time.perf_counter()
        model(**model_inputs(batch), labels=batch["labels"], label_mask=batch["label_mask"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * BATCH / (time.perf_counter() - start)


def train_py_rate(workers: int, steps: int) -> float:
    """train.py's own pairs/s (the default recipe, summed losses) with `workers` loader processes."""
    with tempfile.TemporaryDirectory() as out:
        args = ["--train.max_steps", str(steps), "--train.loss_weighting", "sum", "--data.num_workers", str(workers)]
        return BATCH / train_run(args, Path(out))["train_s_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--steps", type=int, default=60, help="train.py steps per worker count")
    options = parser.parse_args()
    config = Config()
    data = build_splits(config)
    config.model.tasks = data.tasks
    worker_counts = (0, 1, 2, 4) if torch.cuda.is_available() else (0, 1, 2)
    rates = {f"loader_{w}_workers": loader_rate(data, w, options.batches) for w in worker_counts}
    rates["model_training"] = training_rate(config, data, options.batches)
    rates.update({f"train_py_{w}_workers": train_py_rate(w, options.steps) for w in worker_counts})
    for name, rate in rates.items():
        print(f"{name:>20}: {rate:8.1f} pairs/s")
    verdict = min(v for k, v in rates.items() if k.startswith("loader")) / rates["model_training"]
    print(f"slowest loader / training = {verdict:.1f}x")
    write_result(
        "data_throughput",
        {
            "settings": {**vars(options), "batch_size": BATCH, "recipe": "default"},
            "pairs_per_s": rates,
            "slowest_loader_over_training": verdict,
        },
    )


if __name__ == "__main__":
    main()
