"""Fine-tuning from a checkpoint: compatible parts load exactly, new or changed tasks get fresh heads."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_imagefolder, make_rows
from safetensors.torch import load_file
from test_train import TINY, _records, _run

from mmfusion import FusionModel
from mmfusion.model import load_compatible, read_model_config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny run on tasks label (blue/red), score and tags."""
    root = tmp_path_factory.mktemp("pretrain")
    make_imagefolder(root / "data", {"train": make_rows(24), "validation": make_rows(8, 100)})
    out = root / "run"
    assert (
        _run(["--data.path", str(root / "data"), *TINY, "--train.max_steps", "3", "--train.output_dir", str(out)]) == 0
    )
    return out / "final"


def _new_data(root):
    """Same images, one task added (`mood`), one label set changed (`label` gains green)."""
    rows, validation = make_rows(24), make_rows(8, 100)
    for i, row in enumerate(rows + validation):
        row["mood"] = row["caption"].split()[0]
        if i % 4 == 0:
            row["label"] = "green"
    make_imagefolder(root, {"train": rows, "validation": validation})


def test_load_compatible_keeps_encoders_fusion_and_unchanged_heads(pretrained):
    source = load_file(pretrained / "model.safetensors")
    config = read_model_config(pretrained)
    old = {t.name: t for t in config.tasks}
    config.tasks = [
        old["score"],
        old["tags"],
        type(old["label"])("label", labels=["blue", "green", "red"]),  # changed label set
        type(old["label"])("mood", labels=["calm", "happy", "sad"]),  # new task
    ]
    torch.manual_seed(123)
    model = FusionModel(config)
    report = load_compatible(model, pretrained)
    state = model.state_dict()
    kept = [k for k in source if not k.startswith(("heads.label", "aux_heads.label"))]
    for key in kept:
        assert torch.equal(state[key], source[key]), key  # byte-identical after loading
    assert not torch.equal(state["heads.label.output.bias"][:2], source["heads.label.output.bias"])
    assert state["heads.label.output.weight"].shape[0] == 3 and "heads.mood.output.weight" in state
    assert "kept heads: ['score', 'tags']" in report
    assert "re-initialised heads (new or changed tasks): ['label', 'mood']" in report
    assert "dropped tasks (only in the checkpoint): none" in report


def test_fine_tune_from_checkpoint_with_a_new_and_a_changed_task(pretrained, tmp_path, capsys):
    _new_data(tmp_path / "data")
    out = tmp_path / "run"
    args = [
        "--data.path",
        str(tmp_path / "data"),
        *TINY,
        "--train.max_steps",
        "3",
        "--train.output_dir",
        str(out),
        "--train.init_from",
        str(pretrained),
        "--train.freeze_encoders_steps",
        "3",
        "--model.fusion",
        "concat",
    ]  # --model.fusion is ignored: the architecture comes from the checkpoint (the default, gated)
    assert _run(args) == 0
    printed = capsys.readouterr().out
    assert "re-initialised heads (new or changed tasks): ['label', 'mood']" in printed
    tuned = json.loads((out / "final" / "config.json").read_text())
    assert tuned["fusion"] == "gated" and {t["name"] for t in tuned["tasks"]} == {"label", "mood", "score", "tags"}
    # encoders were frozen for all 3 steps: they still equal the checkpoint's
    before, after = load_file(pretrained / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    encoder_keys = [k for k in before if k.startswith(("image_encoder.", "text_encoder."))]
    assert encoder_keys and all(torch.equal(before[k], after[k]) for k in encoder_keys)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("fusion."))
    assert _records(out, "validation")[-1]["mood"]["count"] == 8
    card = (out / "best" / "README.md").read_text()
    assert "**mood** (classification" in card and "## Validation metrics" in card


def test_init_from_a_missing_checkpoint_names_it(tmp_path, capsys):
    _new_data(tmp_path / "data")
    code = _run(
        [
            "--data.path",
            str(tmp_path / "data"),
            *TINY,
            "--train.output_dir",
            str(tmp_path / "run"),
            "--train.init_from",
            str(tmp_path / "nope"),
        ]
    )
    assert code == 2 and "checkpoint directory not found" in capsys.readouterr().err
