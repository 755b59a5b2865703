"""save_pretrained / from_pretrained: exact round trips, no pickle, and errors that name the problem."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_batch, tiny_config

from mmfusion import FusionModel
from mmfusion.errors import CheckpointError
from mmfusion.model import MODEL_CONFIG_NAME, WEIGHTS_NAME


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = FusionModel(tiny_config("simple_cnn", "gru", "gated")).eval()
    directory = model.save_pretrained(tmp_path / "ckpt")
    return model, directory


def test_directory_holds_config_and_safetensors_only(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == [MODEL_CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((directory / MODEL_CONFIG_NAME).read_text())
    assert config["architecture"] == "FusionModel" and config["mmfusion_version"]
    assert [t["name"] for t in config["tasks"]] == ["topic", "tags", "score", "pair"]
    assert config["tasks"][2]["target_std"] == 3.0
    assert not list(directory.parent.glob(".ckpt.tmp-*")), "staging directory left behind"


def test_round_trip_restores_every_tensor_exactly(saved):
    model, directory = saved
    loaded = FusionModel.from_pretrained(directory)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_saving_again_replaces_atomically(saved, tmp_path):
    model, directory = saved
    with torch.no_grad():
        model.heads["topic"].output.bias.add_(1.0)
    model.save_pretrained(directory)
    assert torch.equal(
        FusionModel.from_pretrained(directory).heads["topic"].output.bias, model.heads["topic"].output.bias
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_leaves_previous_checkpoint_intact(saved, monkeypatch):
    model, directory = saved
    before = (directory / WEIGHTS_NAME).read_bytes()

    def failing_save_file(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("mmfusion.model.save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(directory)
    assert (directory / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ckpt"]


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found: .*nowhere"):
        FusionModel.from_pretrained(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="not an mmfusion checkpoint: .*config.json is missing"):
        FusionModel.from_pretrained(tmp_path)


def test_foreign_config(saved):
    _, directory = saved
    (directory / MODEL_CONFIG_NAME).write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="not an mmfusion FusionModel config"):
        FusionModel.from_pretrained(directory)


def test_config_with_unknown_key_names_it(saved):
    _, directory = saved
    config = json.loads((directory / MODEL_CONFIG_NAME).read_text())
    config["fusoin"] = "gated"
    (directory / MODEL_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown key 'fusoin'; did you mean 'fusion'"):
        FusionModel.from_pretrained(directory)


def test_truncated_weights(saved):
    _, directory = saved
    data = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        FusionModel.from_pretrained(directory)


def test_pickle_file_is_refused(saved):
    _, directory = saved
    torch.save({"x": torch.zeros(1)}, directory / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        FusionModel.from_pretrained(directory)


def test_weights_from_another_config_name_the_mismatch(saved, tmp_path):
    _, directory = saved
    other = FusionModel(tiny_config("simple_cnn", "gru", "gated", dim=48)).save_pretrained(tmp_path / "other")
    (directory / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())
    with pytest.raises(
        ValueError, match=r"shape mismatch \(22\): .*fusion\.image\.weight: expected \(32, 16\), found \(48, 16\)"
    ):
        FusionModel.from_pretrained(directory)


def test_save_into_a_file_path_fails_clearly(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(NotADirectoryError, match="it exists and is a file"):
        model.save_pretrained(target)


def test_hf_checkpoint_rebuilds_without_the_original_model_files(tmp_path, minilm_path):
    torch.manual_seed(0)
    model = FusionModel(tiny_config("simple_cnn", "hf", "concat", text_model=minilm_path)).eval()
    directory = model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((directory / MODEL_CONFIG_NAME).read_text())
    config["text_model"] = str(tmp_path / "moved-away")  # the original weights are no longer needed
    (directory / MODEL_CONFIG_NAME).write_text(json.dumps(config))
    loaded = FusionModel.from_pretrained(directory).eval()
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    torch.testing.assert_close(loaded(**batch).logits["topic"], model(**batch).logits["topic"], atol=0, rtol=0)


def test_checkpoints_with_a_0d_temperature_still_load(saved):
    """Matching heads keep their temperature as a [1] tensor (FSDP shards no 0-d parameters); checkpoints written
    before hold it 0-d and load as they did, through from_pretrained and through load_state_dict (resume)."""
    from safetensors.torch import load_file, save_file

    model, directory = saved
    assert model.heads["pair"].logit_scale.shape == (1,)
    state = load_file(directory / WEIGHTS_NAME)
    state["heads.pair.logit_scale"] = state["heads.pair.logit_scale"].reshape(()) + 0.5
    save_file(state, directory / WEIGHTS_NAME)
    loaded = FusionModel.from_pretrained(directory)
    assert torch.equal(loaded.heads["pair"].logit_scale, model.heads["pair"].logit_scale + 0.5)
    fresh = FusionModel(model.config)
    fresh.load_state_dict(load_file(directory / WEIGHTS_NAME))
    assert torch.equal(fresh.heads["pair"].logit_scale, loaded.heads["pair"].logit_scale)
