"""Interrupted and failing runs lose nothing: kill -9 and resume, SIGTERM, non-finite losses, a full disk."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_imagefolder, make_rows
from safetensors.torch import load_file
from test_train import ROOT, TINY, _records, _run

from mmfusion.training import checkpoint_dirs, resolve_resume

SLOW = [
    *TINY,
    "--train.batch_size",
    "4",
    "--train.save_every",
    "1",
    "--train.log_every",
    "1",
    "--train.eval_every",
    "25",
    "--model.dropout",
    "0.2",
    "--train.modality_dropout",
    "0.2",
    "--data.missing_modality",
    "placeholder",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_imagefolder(root, {"train": make_rows(40), "validation": make_rows(8, 100)})
    return root


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_new_checkpoint(run: Path, before: int, process: subprocess.Popen, timeout: float) -> bool:
    """Whether the run saved a training state after step `before` while still running, within `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if _steps_saved(run) > before:
            return True
        time.sleep(0.05)
    return False


def _steps_saved(run: Path) -> int:
    found = checkpoint_dirs(run)
    return int(found[-1].name.split("_")[1]) if found else 0


def _final_weights_equal(a: Path, b: Path) -> bool:
    first, second = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_five_times_then_resume_ends_bit_identical(data, tmp_path):
    """The default recipe's weighting (GradNorm, which has state) included: every kill lands after a checkpoint
    of the current launch, every relaunch resumes from a step > 0, and the end is bit-identical."""
    args = [
        "--data.path",
        str(data),
        *SLOW,
        "--train.max_steps",
        "150",  # on a quiet machine a launch runs tens of steps between a checkpoint and the kill
        "--train.keep_checkpoints",
        "2",
        "--train.loss_weighting",
        "gradnorm",
        "--data.augment",
        "true",
    ]
    straight = tmp_path / "straight"
    assert _run([*args, "--train.output_dir", str(straight)]) == 0

    run = tmp_path / "killed"
    rng = random.Random(0)
    deadline = time.time() + 600
    for kill in range(5):
        saved = _steps_saved(run)
        process = _start([*args, "--train.output_dir", str(run), "--train.resume", "latest"], tmp_path)
        progressed = _wait_for_new_checkpoint(run, saved, process, deadline - time.time())
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere: mid-step, mid-evaluation, mid-checkpoint-write
        still_running = process.poll() is None
        process.kill()
        out, err = process.communicate()
        assert progressed and still_running, f"launch {kill}: no checkpoint before the kill\n{err[-2000:]}"
        if kill:
            resumed = re.search(r"resumed from \S+ at step (\d+)", out)
            assert resumed and int(resumed.group(1)) >= saved > 0, f"launch {kill} did not resume:\n{out[-2000:]}"
        latest = resolve_resume("latest", run)
        assert (latest / "loss_weighting.safetensors").is_file(), f"{latest} lacks the GradNorm state"
    process = _start([*args, "--train.output_dir", str(run), "--train.resume", "latest"], tmp_path)
    _, err = process.communicate(timeout=max(60, deadline - time.time()))
    assert process.returncode == 0, err[-2000:]
    assert _final_weights_equal(straight, run), "resumed weights differ from the uninterrupted run"


class Killed(BaseException):
    """Stands for kill -9: nothing that catches exceptions runs, no clean-up."""


def test_a_kill_during_the_weighting_state_write_cannot_change_the_resume(data, tmp_path, monkeypatch, capsys):
    from mmfusion.weighting import LossWeighting

    args = [
        "--data.path",
        str(data),
        *SLOW,
        "--train.max_steps",
        "6",
        "--train.keep_checkpoints",
        "9",
        "--train.loss_weighting",
        "gradnorm",
        "--data.augment",
        "true",
    ]
    straight = tmp_path / "straight"
    assert _run([*args, "--train.output_dir", str(straight)]) == 0

    original, calls = LossWeighting.save, []

    def killed_while_writing(self, directory):
        calls.append(directory)
        if len(calls) == 3:  # step 3: accelerate's state is written, the weighting's half
            (Path(directory) / self.FILE).write_bytes(b"half")
            raise Killed
        return original(self, directory)

    run = tmp_path / "run"
    monkeypatch.setattr(LossWeighting, "save", killed_while_writing)
    with pytest.raises(Killed):
        _run([*args, "--train.output_dir", str(run)])
    monkeypatch.undo()
    assert [p.name for p in checkpoint_dirs(run)] == ["step_1", "step_2"]
    assert _run([*args, "--train.output_dir", str(run), "--train.resume", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _final_weights_equal(straight, run)

    # A step directory without the state of a weighting that has one is refused, never silently restarted.
    incomplete = straight / "checkpoints" / "step_4"
    (incomplete / "loss_weighting.safetensors").unlink()
    code = _run([*args, "--train.output_dir", str(tmp_path / "again"), "--train.resume", str(incomplete)])
    assert code == 2
    assert f"{incomplete} has no loss_weighting.safetensors: the GradNormWeighting state" in capsys.readouterr().err


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_4").mkdir(parents=True)
    (root / "step_4" / "trainer_state.json").write_text("{}")
    (root / ".step_6.tmp").mkdir()  # a crash during the write of step 6
    (root / ".step_6.tmp" / "model.safetensors").write_bytes(b"half")
    (root / "step_8").mkdir()  # no trainer_state.json: incomplete
    assert resolve_resume("latest", tmp_path) == root / "step_4"
    assert resolve_resume("latest", tmp_path / "fresh") is None


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    run = tmp_path / "run"
    process = _start(
        [
            "--data.path",
            str(data),
            *SLOW,
            "--train.max_steps",
            "500",
            "--train.save_every",
            "100",
            "--train.output_dir",
            str(run),
        ],
        tmp_path,
    )
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-2000:]
    assert time.time() - sent < 15
    assert "received signal 15: saved the training state at step" in out
    step = _steps_saved(run)
    assert 0 < step < 500 and step % 100 != 0  # saved at the signal, not at a save_every boundary
    resumed = _run(
        [
            "--data.path",
            str(data),
            *SLOW,
            "--train.max_steps",
            str(step + 2),
            "--train.output_dir",
            str(run),
            "--train.resume",
            "latest",
        ]
    )
    assert resumed == 0 and _records(run, "train")[-1]["step"] == step + 2


def test_non_finite_loss_stops_with_step_and_sources_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    run = tmp_path / "run"
    code = _run(
        [
            "--data.path",
            str(data),
            *SLOW,
            "--train.lr",
            "1e12",
            "--train.max_grad_norm",
            "0",
            "--train.warmup_ratio",
            "0",
            "--train.max_steps",
            "30",
            "--train.output_dir",
            str(run),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(
        r"non-finite loss at step 2 \(epoch 0\); last task losses .*; batch: train row \d+ \(file \d+\.png\)", err
    )
    assert "the last good checkpoint is in" in err
    assert [p.name for p in checkpoint_dirs(run)] == ["step_1"]  # saved before the loss went bad, and kept
    for checkpoint in checkpoint_dirs(run):
        state = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in state.values()), f"{checkpoint} holds non-finite weights"


def test_full_disk_while_saving_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    from accelerate import Accelerator

    original, calls = Accelerator.save_state, []

    def failing(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 3:
            Path(output_dir, "model.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing)
    run = tmp_path / "run"
    code = _run(["--data.path", str(data), *SLOW, "--train.max_steps", "10", "--train.output_dir", str(run)])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err
    assert "saving the training state at step 3 failed" in err and "the previous checkpoint" in err
    assert [p.name for p in checkpoint_dirs(run)] == ["step_1", "step_2"]
    assert not list((run / "checkpoints").glob(".step_*"))
    load_file(checkpoint_dirs(run)[-1] / "model.safetensors")  # still readable
