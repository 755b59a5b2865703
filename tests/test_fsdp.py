"""FSDP2 through accelerate with configs/accelerate/fsdp.yaml's settings, run on CPU (gloo) by tests/fsdp_launch.py:
two processes train as two DDP processes do, checkpoints hold the whole model, a resumed run equals the straight
one, and a loss weighting with learned parameters is refused with a message."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_imagefolder, make_rows, tiny_config
from PIL import Image
from safetensors.torch import load_file

from mmfusion import FusionModel

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.image_widths", "8", "16", "--model.text_dim", "16", "--model.dim", "32", "--model.image_size", "32"]
TINY += ["--train.eval_batch_size", "5", "--train.report", "false", "--model.dropout", "0", "--data.augment", "false"]
TINY += ["--train.batch_size", "4", "--train.loss_weighting", "sum", "--train.max_steps", "6"]


def _fsdp_environment() -> dict[str, str]:
    """The FSDP variables `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets, on CPU in fp32."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args, _, _ = _validate_launch_command(
        parser.parse_args(["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"), "train.py"])
    )
    variables = prepare_multi_gpu_env(args)
    return {k: v for k, v in variables.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}


def _launch(
    tmp_path: Path, output: Path, *options: str, fsdp: bool = True, precision: str = "no"
) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "1"}
    env |= {"ACCELERATE_MIXED_PRECISION": precision, **(_fsdp_environment() if fsdp else {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    script = ROOT / "tests" / "fsdp_launch.py" if fsdp else ROOT / "train.py"  # without FSDP: DDP on CPU
    command += [str(script), "--data.path", str(tmp_path / "data"), *TINY, *options]
    command += ["--train.output_dir", str(output)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=200)


@pytest.mark.timeout(300)
def test_fsdp_trains_like_ddp_saves_the_whole_model_and_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    make_imagefolder(data, {"train": make_rows(40), "validation": make_rows(10, 100)})
    for path in data.rglob("*.png"):  # textured, so that every convolution gets a gradient
        noise = np.random.default_rng(int(path.stem)).integers(-60, 60, (32, 32, 3))
        colour = np.asarray(Image.open(path).resize((32, 32)), dtype=np.int64)
        Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(path)

    sharded, replicated = tmp_path / "fsdp", tmp_path / "ddp"
    run = _launch(tmp_path, sharded, "--train.save_every", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(2 process(es), fsdp)" in run.stdout
    run = _launch(tmp_path, replicated, fsdp=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(2 process(es), multi_cpu)" in run.stdout

    fsdp, ddp = (
        load_file(sharded / "final" / "model.safetensors"),
        load_file(replicated / "final" / "model.safetensors"),
    )
    assert fsdp.keys() == ddp.keys()  # the whole model, gathered from both processes' shards
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-4, msg=name)  # reduction order
    FusionModel.from_pretrained(sharded / "best")  # a plain checkpoint

    resumed = tmp_path / "resumed"
    shutil.copytree(sharded / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    run = _launch(tmp_path, resumed, "--train.save_every", "3", "--train.resume", "latest")
    assert run.returncode == 0, run.stderr[-3000:]
    again = load_file(resumed / "final" / "model.safetensors")
    for name in fsdp:
        torch.testing.assert_close(again[name], fsdp[name], rtol=0, atol=0, msg=name)

    refused = _launch(tmp_path, tmp_path / "uncertainty", "--train.loss_weighting", "uncertainty")
    assert refused.returncode != 0
    assert "--train.loss_weighting uncertainty learns parameters outside the model" in refused.stderr
    assert "with FSDP choose sum, nll, dwa, rlw or gls" in refused.stderr


@pytest.mark.timeout(200)
def test_fsdp_in_bf16_trains_a_batch_norm_encoder(tmp_path):
    """FSDP casts the parameters it manages to bf16; batch norm keeps float32 running statistics and refused bf16
    weights beside them (resnet50 on an H200), so BatchNorm layers are float32 shard units of their own."""
    make_imagefolder(tmp_path / "data", {"train": make_rows(16), "validation": make_rows(5, 100)})
    options = ["--model.image_encoder", "resnet18", "--model.image_weights", "None", "--train.max_steps", "2"]
    run = _launch(tmp_path, tmp_path / "out", *options, precision="bf16")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(2 process(es), fsdp, bf16)" in run.stdout


def test_fsdp_shards_each_repeated_block():
    """The classes FSDP's transformer-based wrap policy shards one by one: composite blocks that repeat (CNN stages,
    residual blocks, fusion layers), not single layers."""
    assert FusionModel(tiny_config("resnet18", "lstm", "concat"))._no_split_modules == ["BasicBlock", "Sequential"]
    assert "Linear" not in FusionModel(tiny_config("simple_cnn", "transformer", "cross_attention"))._no_split_modules
