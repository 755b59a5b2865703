"""What every benchmark records beside its figures: the machine, the versions, and where the JSON goes."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    """Machine and library versions, so figures are never read without their context."""
    import accelerate
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def write_result(name: str, result: dict) -> Path:
    """Write results/NAME.json, or results/NAME_gpu.json on a CUDA machine, so GPU figures never replace CPU ones."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}{'_gpu' if torch.cuda.is_available() else ''}.json"
    path.write_text(json.dumps({"environment": environment(), **result}, indent=2))
    print(f"wrote {path}")
    return path


ROOT = Path(__file__).resolve().parents[1]


def best_seconds(step, repeats: int, device: torch.device) -> float:
    """The fastest of `repeats` calls of `step` (timed to the GPU's completion on CUDA). Call it once first to
    warm up: noise on a shared machine only ever slows a call down, so the minimum is the figure to compare."""
    import time

    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def train_run(args: list[str], output_dir: Path) -> dict:
    """Run train.py in a fresh process; return its best validation record, time to reach it, and step time."""
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *args,
        "--train.output_dir",
        str(output_dir),
        "--train.report",
        "false",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"train.py failed ({' '.join(args)}):\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if r["split"] == "validation"]
    best = max(validation, key=lambda r: r["summary"])
    train = [r for r in records if r["split"] == "train"]
    steps = train[-1]["step"]
    return {
        "best": best,
        "time_to_best_s": best["elapsed_s"],
        "wall_s": time.perf_counter() - start,
        "steps": steps,
        "train_s_per_step": train[-1]["elapsed_s"] / steps,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0
