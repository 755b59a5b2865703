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
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def cpu_model() -> str | None:
    """The CPU's model name (Linux): the same code gives slightly different floats on another CPU model."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


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
    """Run train.py in a fresh process; return its best validation record (best/ is chosen on validation), best/'s
    test metrics (what tables report), the time to reach best, and the step time."""
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
    sys.path.insert(0, str(ROOT))
    from mmfusion.runlog import best_record, read_history, read_run_config

    history = read_history(output_dir)
    best = best_record(history.validation, read_run_config(output_dir).train.best_metric)
    train = history.train
    steps = train[-1]["step"]
    return {
        "best": best,
        "test": history.test,
        "time_to_best_s": best["elapsed_s"],
        "wall_s": time.perf_counter() - start,
        "steps": steps,
        "train_s_per_step": train[-1]["elapsed_s"] / steps,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    import statistics

    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def timed_train(command: list[str], output_dir: Path) -> dict:
    """Run a train.py command line (its output directory set to `output_dir`) from the repository root; return its
    wall clock, the run's metrics.jsonl history and the machine's load average before and after."""
    import os
    import subprocess
    import sys
    import time

    sys.path.insert(0, str(ROOT))
    from mmfusion.runlog import read_history

    load_before = os.getloadavg()
    start = time.perf_counter()
    result = subprocess.run([*command, "--train.output_dir", str(output_dir)], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return {
        "wall_s": round(wall, 1),
        "history": read_history(output_dir),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def without_bookkeeping(record: dict) -> dict:
    """A metrics.jsonl record's metrics alone."""
    return {k: v for k, v in record.items() if k not in ("step", "epoch", "split", "elapsed_s", "checkpoint")}
