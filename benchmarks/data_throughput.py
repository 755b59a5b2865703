"""Is the data loader ever the bottleneck? Loader pairs/s with 0, 1 and 2 workers beside the model's training
consumption of the same batches (forward, backward, optimizer step on pre-loaded batches).

    python benchmarks/data_throughput.py [--batches 60]

Writes benchmarks/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import time

from common import write_result

from mmfusion.config import Config
from mmfusion.data import model_inputs
from mmfusion.model import FusionModel
from mmfusion.training import build_optimizer, make_loader, prepare_data

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
    cached = [batch for batch, _ in zip(loader, range(batches + 5))]
    model = FusionModel(config.model).train()
    optimizer = build_optimizer(model, config.train)
    start = None
    for i, batch in enumerate(cached):
        if i == 5:
            start = time.perf_counter()
        model(**model_inputs(batch), labels=batch["labels"], label_mask=batch["label_mask"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batches * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    options = parser.parse_args()
    config = Config()
    data = prepare_data(config)
    config.model.tasks = data.tasks
    rates = {f"loader_{w}_workers": loader_rate(data, w, options.batches) for w in (0, 1, 2)}
    rates["model_training"] = training_rate(config, data, options.batches)
    for name, rate in rates.items():
        print(f"{name:>20}: {rate:8.1f} pairs/s")
    verdict = min(v for k, v in rates.items() if k.startswith("loader")) / rates["model_training"]
    print(f"slowest loader / training = {verdict:.1f}x")
    write_result("data_throughput", {"settings": {**vars(options), "batch_size": BATCH, "recipe": "default"},
                                     "pairs_per_s": rates, "slowest_loader_over_training": verdict})  # fmt: skip


if __name__ == "__main__":
    main()
