"""Interrupted and failing runs lose nothing: kill -9 and resume, SIGTERM, non-finite losses, a full disk."""

from __future__ import annotations

import os
import random
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

SLOW = [*TINY, "--train.batch_size", "4", "--train.save_every", "1", "--train.log_every", "1",
        "--train.eval_every", "25", "--model.dropout", "0.2", "--train.modality_dropout", "0.2",
        "--data.missing_modality", "placeholder"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_imagefolder(root, {"train": make_rows(40), "validation": make_rows(8, 100)})
    return root


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_new_checkpoint(run: Path, before: int, process: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if len(list((run / "checkpoints").glob("step_*"))) > before or _steps_saved(run) > before:
            return True
        time.sleep(0.05)
    return False


def _steps_saved(run: Path) -> int:
    found = checkpoint_dirs(run)
    return int(found[-1].name.split("_")[1]) if found else 0


def test_kill_9_five_times_then_resume_ends_bit_identical(data, tmp_path):
    args = ["--data.path", str(data), *SLOW, "--train.max_steps", "40", "--train.keep_checkpoints", "2"]
    straight = tmp_path / "straight"
    assert _run([*args, "--train.output_dir", str(straight)]) == 0

    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    while kills < 5:
        process = _start([*args, "--train.output_dir", str(run), "--train.resume", "latest"], tmp_path)
        if _wait_for_new_checkpoint(run, _steps_saved(run), process):
            time.sleep(rng.uniform(0.0, 0.3))  # anywhere: mid-step, mid-evaluation, mid-checkpoint-write
        if process.poll() is None:
            process.kill()
            kills += 1
        process.communicate()
        assert all(p.name.startswith("step_") or p.name.startswith(".step_") for p in (run / "checkpoints").iterdir())
    process = _start([*args, "--train.output_dir", str(run), "--train.resume", "latest"], tmp_path)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_4").mkdir(parents=True)
    (root / "step_4" / "trainer_state.json").write_text("{}")
    (root / ".step_6.tmp").mkdir()  # a crash during the write of step 6
    (root / ".step_6.tmp" / "model.safetensors").write_bytes(b"half")
    (root / "step_8").mkdir()  # no trainer_state.json: incomplete
    assert resolve_resume("latest", tmp_path) == root / "step_4"
    assert resolve_resume("latest", tmp_path / "fresh") is None


def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    run = tmp_path / "run"
    process = _start(["--data.path", str(data), *SLOW, "--train.max_steps", "500", "--train.save_every", "100",
                      "--train.output_dir", str(run)], tmp_path)  # fmt: skip
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
    resumed = _run(["--data.path", str(data), *SLOW, "--train.max_steps", str(step + 2), "--train.output_dir",
                    str(run), "--train.resume", "latest"])  # fmt: skip
    assert resumed == 0 and _records(run, "train")[-1]["step"] == step + 2


def test_non_finite_loss_stops_with_step_and_sources_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    run = tmp_path / "run"
    code = _run(["--data.path", str(data), *SLOW, "--train.lr", "1e12", "--train.max_grad_norm", "0",
                 "--train.warmup_ratio", "0", "--train.max_steps", "30", "--train.output_dir", str(run)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "non-finite" in err and "step" in err
    if "non-finite loss" in err:
        assert "batch: train row" in err and ".png" in err
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
