"""`mmfusion --help`, every command's --help and `python train.py --help` start without importing the heavy
libraries (benchmarks/startup.py measures the time; this checks the cause, which timing on a busy machine cannot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "datasets", "accelerate", "torchmetrics", "transformers", "pandas", "onnxruntime", "fastapi")


def imported_modules(*args: str) -> set[str]:
    """Top-level modules a fresh `python -X importtime ARGS` imports (it must succeed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split("|")[-1] for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.strip().split(".")[0] for line in lines}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args",
    [
        ["-m", "mmfusion", "--help"],
        ["-m", "mmfusion", "evaluate", "--help"],
        ["-m", "mmfusion", "export", "--help"],
        ["-m", "mmfusion", "serve", "--help"],
        ["train.py", "--help"],
        ["-c", "import mmfusion; mmfusion.Config, mmfusion.TaskSpec"],
    ],
)
def test_help_and_import_leave_the_heavy_libraries_alone(args):
    modules = imported_modules(*args)
    assert "mmfusion" in modules or args[0] == "train.py"
    assert sorted(modules & set(HEAVY)) == []


def test_a_lazy_name_loads_its_module():
    import mmfusion

    assert mmfusion.Predictor.__module__ == "mmfusion.predictor"
    assert mmfusion.evaluate.__module__ == "mmfusion.predictor"
    with pytest.raises(AttributeError, match="module 'mmfusion' has no attribute 'Nothing'"):
        mmfusion.Nothing  # noqa: B018
