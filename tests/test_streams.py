"""Streams: shuffled per epoch, split among processes by shards (or rows), and resumed at the exact row."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_hub_repo, make_rows
from safetensors.torch import load_file

from mmfusion.config import Config, DataConfig, FusionConfig, TaskSpec
from mmfusion.errors import InputError
from mmfusion.prepare import build_splits
from mmfusion.streams import FusionStream, resume_stream

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


@pytest.fixture(autouse=True)
def no_sleep_after_parallel_shard_reads(monkeypatch):
    """datasets sleeps 5 s after each pass that read parquet shards in threads (a guard against a pyarrow crash at
    interpreter exit); these tests make dozens of passes and exit much later."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _stream(data: Path, **options) -> FusionStream:
    config = Config(
        model=FusionConfig(image_size=16),
        data=DataConfig(path=str(data), streaming=True, **options),
        tasks=[TaskSpec("label")],
    )
    return build_splits(config).datasets["train"]


def _captions(stream: FusionStream, epoch: int) -> list[str]:
    stream.set_epoch(epoch)
    return [row["caption"] for row in stream.rows()]


@pytest.mark.parametrize("shards", [4, 3])  # 4: two whole shards per process; 3: every other row
def test_a_training_stream_is_shuffled_per_epoch_and_split_among_processes(tmp_path, monkeypatch, shards):
    make_hub_repo(tmp_path, {"train": make_rows(24), "validation": make_rows(4, 100)}, shards=shards)
    stream = _stream(tmp_path, shuffle_buffer=8)
    everything = sorted(row["caption"] for row in stream.split)
    assert _captions(stream, 0) == _captions(stream, 0) != _captions(stream, 1)  # seeded by seed + epoch
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(FusionStream, "process", lambda self, rank=rank: (rank, 2))
        parts.append(_captions(stream, 0))
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == everything
    assert len(parts[0]) == len(parts[1]) == 12


def test_resuming_at_a_position_gives_the_rows_and_crops_the_pass_would_have_given(tmp_path):
    make_hub_repo(tmp_path, {"train": make_rows(24), "validation": make_rows(4, 100)}, shards=3)
    stream = _stream(tmp_path, shuffle_buffer=6, augment=True)
    stream.set_epoch(2)
    whole = list(stream)
    assert stream.position == 24
    again = _stream(tmp_path, shuffle_buffer=6, augment=True)
    again.set_epoch(2)
    again.resume_at(9)
    rest = list(again)
    assert [item["row"] for item in rest] == [item["row"] for item in whole[9:]]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(rest, whole[9:]))
    assert again.position == 24 and [item["row"] for item in again][:2] == [item["row"] for item in whole[:2]]
    with pytest.raises(InputError, match="read by 2 processes and cannot resume exactly on 1"):
        resume_stream(again, [5, 7], 1, 0)


def _train(args: list[str]) -> int:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return train.main(args)


def test_train_py_resumes_a_stream_mid_epoch_bit_identically(tmp_path):
    data = tmp_path / "data"
    make_hub_repo(data, {"train": make_rows(40), "validation": make_rows(6, 100)}, shards=4)
    args = ["--data.path", str(data), "--data.streaming", "true", "--data.shuffle_buffer", "16"]
    args += ["--data.augment", "true"]  # each row's crop follows (seed, epoch, row): the resumed run must redraw it
    args += ["--model.image_widths", "8", "--model.text_dim", "16", "--model.dim", "32", "--model.image_size", "16"]
    args += ["--train.batch_size", "8", "--train.max_steps", "8", "--train.save_every", "3", "--train.log_every", "1"]
    args += ["--train.eval_every", "8", "--train.report", "false", "--train.keep_checkpoints", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _train([*args, "--train.output_dir", str(straight)]) == 0
    state = json.loads((straight / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["stream_rows"] == [24] and state["batches_in_epoch"] == 3
    state = json.loads((straight / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"], state["stream_rows"]) == (1, 1, [8])  # 5 batches an epoch

    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    assert _train([*args, "--train.output_dir", str(resumed), "--train.resume", "latest"]) == 0
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["losses"]) for r in logged if r["split"] == "train" and r["step"] > 3]
    assert losses == [(r["step"], r["losses"]) for r in again if r["split"] == "train"]


def test_a_streams_held_out_validation_keeps_its_rows_whatever_the_shard_order(tmp_path):
    from mmfusion.data import load_splits

    make_hub_repo(tmp_path, {"train": make_rows(30)}, shards=3)
    loaded = load_splits(tmp_path, DataConfig(path=str(tmp_path), streaming=True, val_fraction=0.3))
    validation = {row["caption"] for row in loaded.splits["validation"]}
    assert 0 < len(validation) < 30
    for seed in (0, 1, 2):  # each epoch shuffles the shards' order: no row may change sides
        train = {row["caption"] for row in loaded.splits["train"].shuffle(seed=seed, buffer_size=4)}
        assert not train & validation and len(train | validation) == 30
