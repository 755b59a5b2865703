"""Several machines through accelerate: two "machines" on 127.0.0.1 (two `accelerate launch --num_machines 2
--machine_rank R` on CPU with gloo) train as one machine with the same global batch does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_imagefolder, make_rows
from PIL import Image
from safetensors.torch import load_file
from test_train import _run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.image_widths", "8", "16", "--model.text_dim", "16", "--model.dim", "32", "--model.image_size", "32"]
TINY += ["--train.eval_batch_size", "5", "--train.report", "false", "--model.dropout", "0", "--data.augment", "false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine(rank: int, port: int) -> list[str]:
    """The launch command of machine `rank` of two, one process each (what each machine's user types)."""
    return [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_machines",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def _validation(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "validation"][-1]


@pytest.mark.timeout(240)
def test_two_machines_hold_the_same_weights_and_match_one_machine_with_the_same_global_batch(tmp_path):
    data = tmp_path / "data"
    make_imagefolder(data, {"train": make_rows(40), "validation": make_rows(13, 100)})
    for path in data.rglob("*.png"):  # textured: flat colours leave the first convolution almost without gradient
        noise = np.random.default_rng(int(path.stem)).integers(-60, 60, (32, 32, 3))
        colour = np.asarray(Image.open(path).resize((32, 32)), dtype=np.int64)
        Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(path)
    common = ["--data.path", str(data), *TINY, "--train.max_steps", "6", "--train.eval_every", "6"]
    one = tmp_path / "one"  # one machine, one process (this one)
    assert _run([*common, "--train.batch_size", "8", "--train.output_dir", str(one)]) == 0

    two, weights = tmp_path / "two", tmp_path / "weights"
    weights.mkdir()
    script = [str(ROOT / "tests" / "multi_machine_check.py"), str(weights), *common, "--train.batch_size", "4"]
    script += ["--train.output_dir", str(two)]  # a directory both machines share, as resuming needs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "1"}
    port = _free_port()
    machines = [
        subprocess.Popen(
            [*_machine(rank, port), *script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=200) for machine in machines]
    for machine, (_, err) in zip(machines, outputs):
        assert machine.returncode == 0, err[-3000:]

    first, second = load_file(weights / "process0.safetensors"), load_file(weights / "process1.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)  # bit for bit
    alone = load_file(one / "final" / "model.safetensors")
    saved = load_file(two / "final" / "model.safetensors")
    for name in alone:
        torch.testing.assert_close(saved[name], first[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(first[name], alone[name], rtol=1e-5, atol=2e-6, msg=name)
    a, b = _validation(one), _validation(two)
    assert a["label"]["count"] == b["label"]["count"] == 13  # every validation row counted once over both machines
    for task in ("label", "score", "tags"):
        assert a[task] == pytest.approx(b[task], rel=1e-5, abs=1e-6), task


def test_fsdp_and_zero2_accelerate_configs_are_what_accelerate_launch_reads():
    """What `accelerate launch --config_file ...` does with them up to starting processes (FSDP needs GPUs to run:
    on CPU accelerate falls back to DDP; DeepSpeed is not installed here), and FSDP's plugin built from the launch
    environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    fsdp, _, _ = _validate_launch_command(
        parser.parse_args(["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"), "train.py"])
    )
    assert fsdp.use_fsdp and fsdp.fsdp_version == 2 and fsdp.num_processes == 8
    environment = {k: v for k, v in prepare_multi_gpu_env(fsdp).items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    with patch_environment(**environment):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.reshard_after_forward is True

    zero2, _, _ = _validate_launch_command(
        parser.parse_args(["--config_file", str(ROOT / "configs/accelerate/zero2.yaml"), "train.py"])
    )
    assert zero2.use_deepspeed and zero2.zero_stage == 2 and zero2.gradient_clipping == "auto"
