"""Training from Python as a notebook would: DataFrames in, mmfusion.train, predictions and metrics as DataFrames and
dicts; the same numbers as the command line; and two CPU processes through accelerate's notebook_launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from helpers import make_imagefolder, make_rows
from test_train import ROOT, TINY, _run

import mmfusion

OPTIONS = {
    "model": {"image_widths": [8, 16], "text_dim": 16, "dim": 32, "image_size": 32},
    "train": {"batch_size": 8, "eval_batch_size": 5, "report": False, "max_steps": 6},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_imagefolder(root, {"train": make_rows(40), "validation": make_rows(13, 100), "test": make_rows(7, 200)})
    return root


def frame(folder: Path, split: str) -> pd.DataFrame:
    """A split as a notebook user holds it: absolute image paths and the label columns."""
    rows = [json.loads(line) for line in (folder / split / "metadata.jsonl").read_text().splitlines()]
    table = pd.DataFrame(rows)
    table["image"] = [str(folder / split / name) for name in table.pop("file_name")]
    return table


def test_dataframes_train_predict_and_evaluate_as_the_command_line_does(folder, tmp_path):
    frames = {split: frame(folder, split) for split in ("train", "validation", "test")}
    options = {**OPTIONS, "train": {**OPTIONS["train"], "output_dir": str(tmp_path / "python")}}
    run = mmfusion.train(options, data=frames)
    assert run.steps == 6 and run.best.is_dir() and run.final.is_dir()
    assert "(in memory" in (tmp_path / "python" / "config.yaml").read_text()  # not the default data.path

    script = tmp_path / "script"
    args = ["--data.path", str(folder), *TINY, "--train.max_steps", "6", "--train.output_dir", str(script)]
    assert _run(args) == 0
    assert run.test == json.loads((script / "test_metrics.json").read_text())  # the same run, to the last digit

    test = frames["test"].set_index(pd.Index([f"row-{i}" for i in range(len(frames["test"]))]))
    predictions = mmfusion.Predictor.from_pretrained(run.best).predict(test)
    assert list(predictions.index) == list(test.index)
    assert set(predictions["label"]) <= {"red", "blue"} and predictions["score"].notna().all()
    metrics = mmfusion.evaluate(run.best, test, batch_size=5)  # training's evaluation batches: the same sums
    assert metrics == run.test


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_cpu_processes_through_notebook_launcher(folder, tmp_path):
    """What a notebook cell runs; in its own interpreter, as a notebook kernel is (no Accelerator created before).
    Without ACCELERATE_USE_CPU, accelerate starts two independent single-process trainings on this machine."""
    options = {**OPTIONS, "train": {**OPTIONS["train"], "output_dir": str(tmp_path / "run")}}
    cell = textwrap.dedent(f"""
        import os
        from accelerate import notebook_launcher
        import mmfusion

        os.environ["ACCELERATE_USE_CPU"] = "1"  # CPU processes (with torch's CUDA build, on a machine without GPU)

        def train():
            mmfusion.train({options!r}, data={str(folder)!r})

        notebook_launcher(train, num_processes=2)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", cell], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 steps of 16 pairs" in result.stdout  # batch 8 per process, 2 processes
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if r["split"] == "validation"]
    assert validation[-1]["step"] == 6 and validation[-1]["label"]["count"] == 13  # every row once, 2 processes
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
