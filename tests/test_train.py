"""train.py end to end: tiny runs of seconds each, resume exactness, two processes, bf16, options and errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import make_imagefolder, make_rows
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from mmfusion.fusions import FUSIONS  # noqa: E402
from mmfusion.training import epochs_for  # noqa: E402

TINY = [
    "--model.image_widths",
    "8",
    "16",
    "--model.text_dim",
    "16",
    "--model.dim",
    "32",
    "--model.image_size",
    "32",
    "--train.batch_size",
    "8",
    "--train.eval_batch_size",
    "5",
    "--train.report",
    "false",
]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_imagefolder(root, {"train": make_rows(40), "validation": make_rows(13, 100), "test": make_rows(7, 200)})
    return root


def _run(args: list[str]) -> int:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return train.main(args)


def _records(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_default_recipe_on_the_bundled_data_for_a_few_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    assert _run(["--train.output_dir", str(out), "--train.max_steps", "3", "--train.report", "false"]) == 0
    printed = capsys.readouterr().out
    assert "3,000 train / 500 validation" in printed and "evaluate with: mmfusion evaluate" in printed
    resolved = (out / "config.yaml").read_text()
    assert (
        "configs/default.yaml" in resolved and "fusion: gated" in resolved and "loss_weighting: uncertainty" in resolved
    )
    for name in ("best", "final"):
        assert {p.name for p in (out / name).iterdir()} >= {
            "config.json",
            "model.safetensors",
            "processor.json",
            "tokenizer.json",
        }
    config = json.loads((out / "final" / "config.json").read_text())
    assert {t["name"] for t in config["tasks"]} == {"area", "background", "colors", "match", "tone", "pair"}
    validation = _records(out, "validation")
    assert validation[-1]["step"] == 3 and set(validation[-1]) >= {"epoch", "summary", "match", "area"}
    assert _records(out, "test")[0]["checkpoint"] == "best"
    assert (out / "config.yaml").is_file() and (out / "test_metrics.json").is_file()


def test_tests_use_their_own_hugging_face_cache_and_train_restores_signal_handlers(tiny_data, tmp_path):
    import datasets
    from huggingface_hub import constants

    assert constants.HF_HOME == os.environ["HF_HOME"] and Path(constants.HF_HOME).name.startswith("mmfusion-tests-hf-")
    assert datasets.config.HF_DATASETS_CACHE.is_relative_to(constants.HF_HOME)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    assert (
        _run(["--data.path", str(tiny_data), *TINY, "--train.max_steps", "1", "--train.output_dir", str(tmp_path)]) == 0
    )
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_resume_mid_epoch_is_bit_identical(tiny_data, tmp_path):
    args = [
        "--data.path",
        str(tiny_data),
        *TINY,
        "--data.augment",
        "true",
        "--train.max_steps",
        "8",
        "--train.save_every",
        "3",
        "--train.keep_checkpoints",
        "5",
        "--train.eval_every",
        "4",
        "--train.log_every",
        "1",
        "--train.modality_dropout",
        "0.3",
        "--data.missing_modality",
        "placeholder",
        "--model.dropout",
        "0.2",
    ]
    straight = tmp_path / "straight"
    assert _run([*args, "--train.output_dir", str(straight)]) == 0
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_3", "step_6"]

    # An interrupted run: what was on disk after step 3 (5 batches per epoch, so mid-epoch).
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    assert _run([*args, "--train.output_dir", str(resumed), "--train.resume", "latest"]) == 0

    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    after = [(r["step"], r["losses"]) for r in _records(straight, "train") if r["step"] > 3]
    assert after == [(r["step"], r["losses"]) for r in _records(resumed, "train")]


def test_matching_memory_changes_the_loss_from_the_second_step_and_resumes_exactly(tiny_data, tmp_path):
    """The remembered pairs are candidates from the second step on, and a resumed run ranks the same ones (each
    process's memory is in the training state)."""
    config = tmp_path / "tasks.yaml"
    config.write_text(
        yaml.safe_dump({"tasks": [{"name": "label", "type": "classification"}, {"name": "p", "type": "matching"}]})
    )
    args = ["--config", str(config), "--data.path", str(tiny_data), *TINY, "--train.max_steps", "6"]
    args += ["--train.save_every", "3", "--train.log_every", "1", "--train.eval_every", "6"]
    runs = {memory: tmp_path / f"memory{memory}" for memory in (0, 16)}
    for memory, out in runs.items():
        assert _run([*args, "--train.matching_memory", str(memory), "--train.output_dir", str(out)]) == 0
    pair_losses = {memory: [r["losses"]["p"] for r in _records(out, "train")] for memory, out in runs.items()}
    assert pair_losses[16][0] == pair_losses[0][0]  # nothing remembered yet
    assert pair_losses[16][1] > pair_losses[0][1] + 0.1  # 8 more candidates than the batch's 8
    assert load_file(runs[16] / "checkpoints" / "step_3" / "matching_memory_0.safetensors")["p"].shape == (16, 64)

    resumed = tmp_path / "resumed"
    shutil.copytree(runs[16] / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    options = ["--train.matching_memory", "16", "--train.output_dir", str(resumed), "--train.resume", "latest"]
    assert _run([*args, *options]) == 0
    assert [r["losses"] for r in _records(resumed, "train")] == [r["losses"] for r in _records(runs[16], "train")][3:]


def test_the_matching_options_reach_the_training_loss(tiny_data, tmp_path, monkeypatch):
    import mmfusion.model

    calls, loss = [], mmfusion.model.matching_loss

    def recorded(spec, logits, labels, mask, memory_logits, negatives):
        calls.append((negatives, None if memory_logits is None else memory_logits[0].shape))
        return loss(spec, logits, labels, mask, memory_logits, negatives)

    monkeypatch.setattr(mmfusion.model, "matching_loss", recorded)
    config = tmp_path / "tasks.yaml"
    config.write_text(yaml.safe_dump({"tasks": [{"name": "p", "type": "matching"}]}))
    options = ["--train.matching_negatives", "rows", "--train.matching_memory", "5", "--train.max_steps", "2"]
    args = ["--config", str(config), "--data.path", str(tiny_data), *TINY, *options]
    assert _run([*args, "--train.output_dir", str(tmp_path / "run")]) == 0
    assert calls == [("rows", None), ("rows", (8, 5))]  # training only: evaluation ranks the whole split


def test_gradient_accumulation_and_schedules(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [
        "--data.path",
        str(tiny_data),
        *TINY,
        "--train.max_steps",
        "4",
        "--train.grad_accumulation",
        "2",
        "--train.scheduler",
        "linear",
        "--train.warmup_ratio",
        "0.25",
        "--train.output_dir",
        str(out),
    ]
    assert _run(args) == 0
    steps = [r["step"] for r in _records(out, "train")]
    assert steps == [4]  # logged at the last step; 4 optimizer steps from 8 batches
    assert _records(out, "train")[-1]["lr"] == 0.0  # linear decay ends at zero


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.fusoin", "gated"], "Perhaps you meant"),
        (["--train.lr", "fast"], "--train.lr"),
        (["--train.batch_size", "0"], "--train.batch_size must be > 0, got 0"),
        (["--train.lr", "-1"], "--train.lr must be > 0"),
        (["--model.fusion", "nope"], "invalid choice 'nope' for argument '--model.fusion'"),
        (["--data.num_workers", "-1"], "--data.num_workers must be >= 0, got -1"),
        (["--data.crop_area", "0"], "--data.crop_area must be in (0, 1], got 0.0"),
        (["--train.gradnorm_alpha", "-0.5"], "--train.gradnorm_alpha must be >= 0, got -0.5"),
        (["--train.gradnorm_min_weight", "1"], "--train.gradnorm_min_weight must be in (0, 1), got 1.0"),
        (["--train.regression_warmup", "1.5"], "--train.regression_warmup must be in [0, 1], got 1.5"),
        (["--train.matching_memory", "-1"], "--train.matching_memory must be >= 0, got -1"),
        (
            ["--train.loss_weighting", "gls", "--train.regression_warmup", "0.3"],
            "--train.regression_warmup does not apply to --train.loss_weighting gls",
        ),
        (
            ["--train.loss_weighting", "nll", "--train.nll_noise_decay", "1"],
            "--train.nll_noise_decay must be in [0, 1), got 1.0",
        ),
        (
            ["--train.nll_noise_decay", "0.9"],
            "--train.nll_noise_decay applies to --train.loss_weighting nll, not uncertainty",
        ),
        (
            ["--train.uncertainty_max_weight", "-1"],
            "--train.uncertainty_max_weight must be >= 0 (0: no bound), got -1.0",
        ),
        (
            ["--train.uncertainty_regression_max_weight", "-0.5"],
            "--train.uncertainty_regression_max_weight must be >= 0 (0: no bound), got -0.5",
        ),
        (
            ["--train.loss_weighting", "sum", "--train.uncertainty_regression_max_weight", "1"],
            "--train.uncertainty_regression_max_weight 1.0 applies to --train.loss_weighting uncertainty, not sum",
        ),
        (
            ["--train.loss_weighting", "nll", "--train.uncertainty_max_weight", "4"],
            "--train.uncertainty_max_weight 4.0 applies to --train.loss_weighting uncertainty, not nll",
        ),
        (
            ["--train.loss_weighting", "sum", "--train.uncertainty_start", "one"],
            "--train.uncertainty_start one applies to --train.loss_weighting uncertainty, not sum",
        ),
        (["--train.label_smoothing", "1"], "--train.label_smoothing must be in [0, 1), got 1.0"),
        (["--train.class_balance", "-1"], "--train.class_balance must be >= 0, got -1.0"),
        (["--train.epochs_at_3000_rows", "0"], "--train.epochs_at_3000_rows must be > 0, got 0.0"),
        (["--train.min_epochs", "0"], "--train.min_epochs must be in (0, 30], got 0.0"),
        (["--data.streaming", "true", "--data.num_workers", "2"], "--data.num_workers must be 0 with --data.streaming"),
    ],
)
def test_bad_options_stop_with_a_message_naming_them(tiny_data, tmp_path, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        code = _run(["--data.path", str(tiny_data), *TINY, "--train.output_dir", str(tmp_path), *args])
        raise SystemExit(code)
    captured = capsys.readouterr()
    assert exit_info.value.code not in (0, None) and message in captured.err + captured.out + str(exit_info.value.code)


def test_a_saved_config_loads_with_uncertainty_options_another_weighting_ignores(tmp_path):
    """A run's config.yaml holds every option, uncertainty's included at whatever default its version had: only the
    command line is refused uncertainty's options under another weighting."""
    from mmfusion.options import parse_args, save_yaml

    saved = parse_args(["--train.loss_weighting", "nll"])
    saved.train.uncertainty_start, saved.train.uncertainty_max_weight = "one", 1.0  # an earlier version's defaults
    save_yaml(saved, tmp_path / "config.yaml")
    loaded = parse_args(["--config", str(tmp_path / "config.yaml")]).train
    assert (loaded.loss_weighting, loaded.uncertainty_start, loaded.uncertainty_max_weight) == ("nll", "one", 1.0)


def test_loader_workers_default_to_zero_on_cpu_and_for_streams_and_four_per_process_on_gpu(monkeypatch):
    from types import SimpleNamespace

    from mmfusion.options import parse_args
    from mmfusion.rows import loader_workers

    def machine(device: str, processes: int = 1):
        return SimpleNamespace(device=torch.device(device), num_processes=processes)

    data = parse_args([]).data
    assert data.num_workers is None and loader_workers(data, machine("cpu")) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(data, machine("cuda")) == 4 and loader_workers(data, machine("cuda", 8)) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 processes on this machine (of 8 in all): the CPUs are shared by 2
    assert loader_workers(data, machine("cuda", 8)) == 4
    assert loader_workers(parse_args(["--data.streaming", "true"]).data, machine("cuda")) == 0
    assert loader_workers(parse_args(["--data.num_workers", "3"]).data, machine("cpu")) == 3


def test_yaml_config_with_overrides_and_unknown_key(tiny_data, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(f"data:\n  path: {tiny_data}\nmodel:\n  fusion: gated\n  dim: 32\ntrain:\n  max_steps: 2\n")
    out = tmp_path / "run"
    assert _run(["--config", str(good), "--model.fusion", "film", *TINY, "--train.output_dir", str(out)]) == 0
    resolved = (out / "config.yaml").read_text()
    assert "fusion: film" in resolved and "max_steps: 2" in resolved
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  fusoin: gated\n")
    with pytest.raises(SystemExit, match="unknown key 'fusoin'; did you mean 'fusion'"):
        _run(["--config", str(bad)])
    bad.write_text("train:\n  lr: fast\n")
    with pytest.raises(SystemExit, match="train: lr: expected float, got 'fast'"):
        _run(["--config", str(bad)])


def test_output_dir_that_is_a_file(tiny_data, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert _run(["--data.path", str(tiny_data), *TINY, "--train.output_dir", str(target)]) == 2
    assert "--train.output_dir" in capsys.readouterr().err


TWO_PROCESSES = [
    "accelerate",
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def _launch(args: list[str], tmp_path: Path, launcher: list[str], script: Path = ROOT / "train.py", timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    if launcher == TWO_PROCESSES:
        env["ACCELERATE_USE_CPU"] = "1"  # two real CPU processes (`--cpu --num_processes 2` starts one)
    return subprocess.run([*launcher, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _one_and_two_processes(common: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The same run on one process with batch 8 (in this one) and on two with batch 4 (the same global batch): the
    two output directories."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run([*common, "--train.batch_size", "8", "--train.output_dir", str(one)]) == 0
    double = _launch([*common, "--train.batch_size", "4", "--train.output_dir", str(two)], tmp_path, TWO_PROCESSES)
    assert double.returncode == 0, double.stderr[-3000:]
    return one, two


def test_bf16_autocast_on_cpu_trains_close_to_float32(tiny_data, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION: the first logged losses (the
    forward of the same initial weights) must differ from float32's by bf16 rounding only."""
    args = ["--data.path", str(tiny_data), *TINY, "--train.max_steps", "2", "--train.log_every", "1"]
    assert _run([*args, "--train.output_dir", str(tmp_path / "fp32")]) == 0
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert _run([*args, "--train.output_dir", str(tmp_path / "bf16")]) == 0
    full, half = _records(tmp_path / "fp32", "train")[0]["losses"], _records(tmp_path / "bf16", "train")[0]["losses"]
    assert full != half  # autocast ran
    assert full == pytest.approx(half, rel=2e-2)
    assert _records(tmp_path / "bf16", "validation")[-1]["label"]["count"] == 13


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """Dropout and augmentation off: one process with batch 8 and two with batch 4 see the same global batches, so
    the weights after 6 steps and the metrics differ by float rounding only. (Textured images: on flat colours the
    first convolution's gradients nearly vanish, and Adam would scale their rounding noise up to full steps.)"""
    data = tmp_path / "data"
    make_imagefolder(data, {"train": make_rows(40), "validation": make_rows(13, 100)})
    for path in data.rglob("*.png"):
        noise = np.random.default_rng(int(path.stem)).integers(-60, 60, (32, 32, 3))
        colour = np.asarray(Image.open(path).resize((32, 32)), dtype=np.int64)
        Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(path)
    common = [
        "--data.path",
        str(data),
        *TINY,
        "--train.max_steps",
        "6",
        "--model.dropout",
        "0",
        "--data.augment",
        "false",
        "--train.eval_every",
        "6",
    ]
    one, two = _one_and_two_processes(common, tmp_path)
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=2e-6, msg=name)
    first, second = _records(one, "validation")[-1], _records(two, "validation")[-1]
    assert first["label"]["count"] == second["label"]["count"] == 13  # every row counted once, none repeated
    for task in ("label", "score", "tags"):
        assert first[task] == pytest.approx(second[task], rel=1e-5, abs=1e-6), task


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_train_and_evaluate_every_fusion_with_sum_and_gradnorm(tiny_data, tmp_path):
    script = ROOT / "tests" / "ddp_fusions_check.py"
    result = _launch([str(tiny_data), str(tmp_path), *TINY, "--train.max_steps", "3"], tmp_path, TWO_PROCESSES, script)
    assert result.returncode == 0, result.stderr[-3000:]
    for fusion in sorted(FUSIONS):
        for weighting in ("sum", "gradnorm"):
            run = tmp_path / f"{fusion}-{weighting}"
            assert _records(run, "validation")[-1]["step"] == 3 and (run / "test_metrics.json").is_file(), run.name


@pytest.mark.slow
def test_two_processes_with_a_time_limit_plan_and_stop_together(tiny_data, tmp_path):
    """Each process times the run on its own clock (here process 1's says 3 s later): they must still plan the
    same number of steps and stop at the same one, or the one that goes on waits for the other forever."""
    script = ROOT / "tests" / "ddp_time_limit_check.py"
    args = [str(tiny_data), str(tmp_path / "run"), *TINY, "--train.time_limit", "25", "--train.report", "false"]
    result = _launch(args, tmp_path, TWO_PROCESSES, script, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = ((tmp_path / "run" / f"process_{i}.txt").read_text() for i in (0, 1))
    assert first == second and int(first.split()[0]) > 12, (first, second)


@pytest.mark.parametrize(
    "weighting", ["nll", "uncertainty", "dwa", "rlw", "gls", "pcgrad", "mgda", "cagrad", "gradnorm"]
)
def test_every_loss_weighting_trains_and_logs_its_weights(tiny_data, tmp_path, weighting):
    out = tmp_path / "run"
    args = [
        "--data.path",
        str(tiny_data),
        *TINY,
        "--train.max_steps",
        "12",
        "--train.log_every",
        "6",
        "--train.loss_weighting",
        weighting,
        "--train.output_dir",
        str(out),
    ]
    assert _run(args) == 0
    logged = _records(out, "train")
    assert [r["step"] for r in logged] == [6, 12]
    for record in logged:
        assert set(record["weights"]) == {"label", "score", "tags"}
        assert all(w >= 0 and w == w for w in record["weights"].values())  # finite, no NaN
        assert all(v == v for v in record["losses"].values())


def test_tasks_get_the_runs_label_smoothing_and_regression_loss_unless_they_set_their_own(tiny_data, tmp_path):
    """Inferred tasks: the classification is smoothed by train.label_smoothing (0.1 by default) and the regression
    trains on train.regression_loss; the other types get 0 and mse; a task's own value wins."""

    def resolved(out: Path, *options: str) -> dict:
        args = ["--data.path", str(tiny_data), *TINY, "--train.max_steps", "1", "--train.output_dir", str(out)]
        assert _run([*args, *options]) == 0
        tasks = yaml.safe_load((out / "config.yaml").read_text())["tasks"]
        return {t["name"]: (t["label_smoothing"], t["loss"]) for t in tasks}

    assert resolved(tmp_path / "default") == {"label": (0.1, "mse"), "score": (0.0, "mse"), "tags": (0.0, "mse")}
    options = ["--train.label_smoothing", "0.2", "--train.regression_loss", "huber"]
    assert resolved(tmp_path / "set", *options) == {
        "label": (0.2, "mse"),
        "score": (0.0, "huber"),
        "tags": (0.0, "mse"),
    }
    config = tmp_path / "tasks.yaml"
    tasks = [{"name": "label", "label_smoothing": 0.05}, {"name": "score", "type": "regression", "loss": "l1"}]
    config.write_text(yaml.safe_dump({"tasks": tasks}))
    assert resolved(tmp_path / "own", "--config", str(config), *options) == {
        "label": (0.05, "mse"),
        "score": (0.0, "l1"),
    }


def test_class_balance_weighs_each_class_by_its_training_rows(tmp_path):
    """--train.class_balance p gives each classification class the weight (n / (K n_k)) ** p from train's label
    counts (a row without a label is not counted), in config.yaml and the checkpoint; other task types and a task
    with its own class_weights are left alone; 0 (the default) sets none."""
    rows = make_rows(40)
    for row in rows:
        row["label"] = "blue" if row["label"] == "blue" and int(row["file_name"][:3]) % 4 == 0 else "red"
    rows[1]["label"] = None  # red, unlabelled: 10 blue and 29 red rows are counted
    data = tmp_path / "data"
    make_imagefolder(data, {"train": rows, "validation": make_rows(13, 100)})

    def weights(out: Path, *options: str) -> dict:
        args = ["--data.path", str(data), *TINY, "--train.max_steps", "1", "--train.output_dir", str(out)]
        assert _run([*args, *options]) == 0
        saved = json.loads((out / "final" / "config.json").read_text())["tasks"]
        resolved = yaml.safe_load((out / "config.yaml").read_text())["tasks"]
        assert [t["class_weights"] for t in saved] == [t["class_weights"] for t in resolved]
        return {t["name"]: t["class_weights"] for t in resolved}

    balanced = weights(tmp_path / "balanced", "--train.class_balance", "1")
    assert balanced["label"] == pytest.approx([39 / 20, 39 / 58], abs=1e-6)  # labels in order: blue, red
    assert balanced["score"] is None and balanced["tags"] is None
    halfway = weights(tmp_path / "halfway", "--train.class_balance", "0.5")
    assert halfway["label"] == pytest.approx([(39 / 20) ** 0.5, (39 / 58) ** 0.5], abs=1e-6)
    assert weights(tmp_path / "off")["label"] is None
    config = tmp_path / "tasks.yaml"
    config.write_text(yaml.safe_dump({"tasks": [{"name": "label", "class_weights": [1.0, 3.0]}]}))
    own = weights(tmp_path / "own", "--config", str(config), "--train.class_balance", "1")
    assert own == {"label": [1.0, 3.0]}


def test_uncertainty_start_and_max_weight_reach_the_weighting(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [
        "--data.path",
        str(tiny_data),
        *TINY,
        "--train.max_steps",
        "1",
        "--train.log_every",
        "1",
        "--train.uncertainty_start",
        "outcomes",
        "--train.uncertainty_max_weight",
        "1",
        "--train.output_dir",
        str(out),
    ]
    assert _run(args) == 0
    labels = {t["name"]: t.get("num_labels") for t in yaml.safe_load((out / "config.yaml").read_text())["tasks"]}
    weights = _records(out, "train")[0]["weights"]  # the first step's, before the weights learn anything
    assert labels["tags"] > 1
    assert weights == pytest.approx({"label": 1.0, "score": 1.0, "tags": float(labels["tags"])})
    # a bound of half the start holds the classification and multilabel weights at half theirs; a regression is free
    bounded = tmp_path / "bounded"
    args[-1] = str(bounded)
    assert _run([*args, "--train.uncertainty_max_weight", "0.5"]) == 0
    expected = {"label": 0.5, "score": 1.0, "tags": labels["tags"] / 2}
    assert _records(bounded, "train")[0]["weights"] == pytest.approx(expected)


def test_regression_warmup_ramps_the_regressions_share_over_the_planned_steps(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--train.max_steps", "4", "--train.log_every", "1", "--train.loss_weighting", "sum"]
    assert (
        _run(["--data.path", str(tiny_data), *args, "--train.regression_warmup", "0.5", "--train.output_dir", str(out)])
        == 0
    )
    weights = [record["weights"] for record in _records(out, "train")]
    assert [w["score"] for w in weights] == pytest.approx([0.0, 0.5, 1.0, 1.0])  # the regression: steps 0-3 of 4
    assert [w["label"] for w in weights] == pytest.approx([1.0] * 4)


def test_streaming_data_trains_with_max_steps(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data.path", str(tiny_data), *TINY, "--data.streaming", "true", "--train.output_dir", str(out)]
    assert _run(common) == 2 and "give --train.max_steps" in capsys.readouterr().err
    assert _run([*common, "--train.max_steps", "4", "--train.eval_every", "2"]) == 0
    validation = _records(out, "validation")
    assert [r["step"] for r in validation] == [2, 4] and validation[-1]["label"]["count"] == 13


def test_tensorboard_tracker_writes_events(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = [
        "--data.path",
        str(tiny_data),
        *TINY,
        "--train.max_steps",
        "2",
        "--train.log_every",
        "1",
        "--train.report_to",
        "tensorboard",
        "--train.output_dir",
        str(out),
    ]
    assert _run(args) == 0
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_time_budget_plans_the_steps_that_fit_with_their_evaluations_and_the_end(monkeypatch):
    from mmfusion import training

    monkeypatch.setattr(training.time, "perf_counter", lambda: 110.0)
    budget = training.TimeBudget(limit=100.0, start=100.0)  # 10 s used
    # 85 s left after the end's 5 s; 0.5 s per step; an evaluation (2 s) per 100 steps and one at the end
    steps = budget.plan(0.5, 2.0, lambda total: total // 100 + 1, 5.0, done=12)
    assert steps == 12 + int((85 - 2 * 2.0) / 0.5) == 174  # 174 steps bring 2 evaluations, which fit
    assert budget.end_seconds == 5.0
    assert not budget.must_stop(evaluation_seconds=2.0)  # 10 + 2 + 5 < 100
    monkeypatch.setattr(training.time, "perf_counter", lambda: 194.0)
    assert budget.must_stop(evaluation_seconds=2.0)  # 94 + 2 + 5 >= 100: end now to finish in time
    assert budget.plan(0.5, 2.0, lambda total: 1, 5.0, done=300) == 301  # nothing fits: one more step at least


def test_time_limit_plans_the_run_and_logs_the_plan(tiny_data, tmp_path):
    """How long the run takes against the limit is measured in benchmarks/time_limit.py, not asserted here."""
    from mmfusion import train as train_in_python

    config = {
        "data": {"path": str(tiny_data)},
        "model": {"image_widths": [8, 16], "image_size": 32, "dim": 32},
        "train": {"batch_size": 4, "time_limit": 20, "report": False, "output_dir": str(tmp_path / "run")},
    }
    run = train_in_python(config)
    plans = [r for r in _records(tmp_path / "run", "event") if r["event"] == "time_limit_plan"]
    assert plans and plans[0]["step"] == 12 and plans[0]["planned_steps"] > 12  # 2 + 10 measured steps
    assert plans[-1]["planned_steps"] == run.steps or run.stopped_by == "time_limit"
    assert run.final.is_dir() and run.best.is_dir() and run.test["label"]["count"] == 7
    assert (tmp_path / "run" / "config.yaml").read_text().count("time_limit: 20") == 1


def test_early_stopping_after_patience_evaluations_without_improvement(tiny_data, tmp_path):
    """With a learning rate of 1e-9 the predicted labels never change, so accuracy never improves."""
    from mmfusion import train as train_in_python
    from mmfusion.options import parse_args

    args = [
        "--data.path",
        str(tiny_data),
        *TINY,
        "--train.max_steps",
        "20",
        "--train.eval_every",
        "2",
        "--train.lr",
        "1e-9",
        "--train.early_stopping_patience",
        "2",
        "--train.best_metric",
        "label/accuracy",
        "--train.output_dir",
        str(tmp_path),
    ]
    run = train_in_python(parse_args(args))
    assert run.stopped_by == "early_stopping" and run.steps == 6 and run.best_step == 2
    assert [r["step"] for r in _records(tmp_path, "validation")] == [2, 4, 6]
    (event,) = _records(tmp_path, "event")
    assert event["event"] == "early_stopping" and event["best_step"] == 2 and event["step"] == 6
    assert _records(tmp_path, "test")[0]["checkpoint"] == "best"


def test_train_from_python_equals_train_py(tiny_data, tmp_path):
    """`mmfusion.train` is the loop train.py runs: a dict, a YAML file or a Config give the same weights."""
    from mmfusion import Run
    from mmfusion import train as train_in_python
    from mmfusion.options import parse_args

    args = ["--data.path", str(tiny_data), *TINY, "--train.max_steps", "4"]
    assert _run([*args, "--train.output_dir", str(tmp_path / "script")]) == 0
    config = parse_args([*args, "--train.output_dir", str(tmp_path / "python")])
    run = train_in_python(config)
    assert isinstance(run, Run) and run.steps == 4 and run.stopped_by is None
    assert run.best == tmp_path / "python" / "best" and run.final == tmp_path / "python" / "final"
    assert run.test == json.loads((tmp_path / "python" / "test_metrics.json").read_text())
    a, b = load_file(tmp_path / "script" / "final" / "model.safetensors"), load_file(run.final / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from_yaml = train_in_python(tmp_path / "python" / "config.yaml")  # the resolved config trains the same way
    c = load_file(from_yaml.final / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_train_py_writes_its_own_report_at_the_end(tiny_data, tmp_path):
    """The end of a run as users get it: train.py writes report.html from the run's own validation split."""
    out = tmp_path / "run"
    args = ["--data.path", str(tiny_data), *TINY, "--train.max_steps", "4", "--train.eval_every", "2"]
    assert _run([*args, "--train.report", "true", "--train.output_dir", str(out)]) == 0
    page = (out / "report.html").read_text()
    data = json.loads(
        re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    )
    validation = _records(out, "validation")
    assert data["best_step"] == max(validation, key=lambda r: r["summary"])["step"]
    assert [r["step"] for r in data["validation"]] == [2, 4]
    assert data["checkpoint"]["modality"]["label"]["both"] is not None  # best/ re-evaluated on validation
    assert "Confusion matrices (validation)" in page and (out / "report" / "confusion_label.png").is_file()


@pytest.mark.parametrize(
    "rows,at_3000_rows,min_epochs,epochs",
    [
        (1, 10.0, 10.0, 30.0),
        (1000, 10.0, 10.0, 17.32),
        (3000, 10.0, 10.0, 10.0),
        (5600, 10.0, 10.0, 10.0),  # the floor: the rule alone gives 7.32 passes
        (15000, 10.0, 10.0, 10.0),
        (10**6, 10.0, 10.0, 10.0),
        (15000, 10.0, 1.0, 4.47),  # the rule before the floor
        (300000, 10.0, 1.0, 1.0),
        (1000, 5.0, 1.0, 8.66),
        (3000, 5.0, 1.0, 5.0),
        (75000, 5.0, 1.0, 1.0),
        (100, 1.0, 40.0, 30.0),  # never above 30
    ],
)
def test_epochs_follow_the_number_of_training_rows(rows, at_3000_rows, min_epochs, epochs):
    assert epochs_for(rows, at_3000_rows, min_epochs) == epochs


def test_default_epochs_come_from_the_training_rows_and_are_recorded(tiny_data, tmp_path, capsys):
    common = ["--data.path", str(tiny_data), *TINY, "--train.eval_every", "1000", "--train.save_every", "1000"]
    out = tmp_path / "run"
    assert _run([*common, "--train.batch_size", "40", "--train.output_dir", str(out)]) == 0
    # 40 training rows: 10 * sqrt(3000 / 40) = 86.6 passes, at most 30; one batch of 40 per pass
    assert "30 steps (30 epochs)" in capsys.readouterr().out
    assert "epochs: 30.0" in (out / "config.yaml").read_text()
    assert max(r["step"] for r in _records(out, "train")) == 30
    scaled = tmp_path / "scaled"
    args = ["--train.batch_size", "40", "--train.epochs_at_3000_rows", "0.5", "--train.min_epochs", "1"]
    assert _run([*common, *args, "--train.output_dir", str(scaled)]) == 0
    assert "5 steps (4.33 epochs)" in capsys.readouterr().out  # 0.5 * sqrt(3000 / 40) = 4.33 passes
    assert max(r["step"] for r in _records(scaled, "train")) == 5
    floored = tmp_path / "floored"
    assert _run([*common, *args[:-2], "--train.output_dir", str(floored)]) == 0
    assert "10 steps (10 epochs)" in capsys.readouterr().out  # 4.33 passes raised to min_epochs 10
    given = tmp_path / "given"
    assert _run([*common, "--train.batch_size", "20", "--train.epochs", "1.5", "--train.output_dir", str(given)]) == 0
    assert max(r["step"] for r in _records(given, "train")) == 3
