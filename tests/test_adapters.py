"""Training pretrained encoders: LoRA adapters (only they train; saved merged or separate), gradient checkpointing
(same gradients, activations recomputed), layer-wise learning-rate decay, and the options' checks."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import tiny_batch
from safetensors.torch import load_file

from mmfusion import FusionConfig, FusionModel, TaskSpec
from mmfusion.adapters import lora_targets
from mmfusion.config import TrainConfig
from mmfusion.options import parse_args
from mmfusion.training import build_optimizer

TASKS = [TaskSpec("topic", num_labels=3), TaskSpec("pair", "matching")]


def config_for(tiny_sources, name: str, **options) -> FusionConfig:
    """CLIP as a dual encoder, or a timm/transformers image encoder with a small LSTM."""
    values = dict(dim=16, text_dim=8, vocab_size=20, fusion_heads=2, dropout=0.0, tasks=TASKS)
    if name in ("clip", "siglip"):
        values["pretrained"] = f"clip:{tiny_sources[name]}"
    else:
        values.update(image_encoder="timm" if name.startswith("timm") else "hf", image_model=str(tiny_sources[name]))
    return FusionConfig(**{**values, **options})


def batch() -> dict:
    """Four 32 px images and texts of ids < 20 (inside every tiny vocabulary), at most 8 tokens."""
    values = tiny_batch(length=8, vocab_size=20)
    return {**values, "labels": {"topic": values["labels"]["topic"], "pair": values["labels"]["pair"]}}


def inputs(values: dict) -> dict:
    return {k: values[k] for k in ("pixel_values", "input_ids", "attention_mask")}


# ----- LoRA -----


@pytest.mark.parametrize("name", ["clip", "timm_vit"])
def test_lora_trains_only_the_adapters(tiny_sources, name):
    options = {"image_lora_rank": 4, "text_lora_rank": 4} if name == "clip" else {"image_lora_rank": 4}
    torch.manual_seed(0)
    model = FusionModel(config_for(tiny_sources, name, **options)).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    lora_encoders = ("image_encoder.", "text_encoder.") if name == "clip" else ("image_encoder.",)
    trainable = {key for key, p in model.named_parameters() if p.requires_grad and key.startswith(lora_encoders)}
    assert trainable and all(".lora_A." in key or ".lora_B." in key for key in trainable)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, encoder_lr=1e-2))
    values = batch()
    for _ in range(3):
        model(**values).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for key in before:
        if key.startswith(lora_encoders) and "lora_" not in key:
            assert torch.equal(after[key], before[key]), f"{key} changed"  # byte-identical
    assert all(not torch.equal(after[key], before[key]) for key in after if ".lora_B." in key)
    assert not torch.equal(after["heads.topic.output.weight"], before["heads.topic.output.weight"])


@pytest.mark.parametrize("lora_save", ["separate", "merged"])
def test_lora_checkpoints_load_merged_or_separate(tiny_sources, tmp_path, lora_save):
    torch.manual_seed(0)
    model = FusionModel(config_for(tiny_sources, "clip", image_lora_rank=2, text_lora_rank=2, lora_save=lora_save))
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if ".lora_B." in key:  # trained adapters: not the zero update they start as
                parameter.normal_(0, 0.5)
    model.eval().save_pretrained(tmp_path / "checkpoint")
    keys = load_file(tmp_path / "checkpoint" / "model.safetensors").keys()
    loaded = FusionModel.from_pretrained(tmp_path / "checkpoint").eval()
    if lora_save == "merged":  # a plain model: base weights only, no adapters
        assert not any("lora_" in key or "base_layer" in key for key in keys)
        assert loaded.config.image_lora_rank == loaded.config.text_lora_rank == 0
    else:
        assert any(".lora_B." in key for key in keys) and loaded.config.image_lora_rank == 2
    with torch.no_grad():
        expected, got = model(**inputs(batch())).logits, loaded(**inputs(batch())).logits
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], atol=1e-5, rtol=1e-5)
    assert any(".lora_B." in key for key in model.state_dict())  # saving merged leaves the live model as it was


@pytest.mark.parametrize(
    "name,expected",
    [
        ("clip", ["k_proj", "q_proj", "v_proj"]),  # CLIP/SigLIP towers
        ("bert", ["key", "query", "value"]),  # BERT-style text encoders
        ("vit", ["k_proj", "q_proj", "v_proj"]),  # transformers 5 ViT
        ("timm_vit", ["qkv"]),  # timm ViTs
    ],
)
def test_default_lora_targets_are_each_familys_attention_projections(tiny_sources, name, expected):
    from transformers import AutoModel

    if name == "timm_vit":
        import timm

        model = timm.create_model(f"local-dir:{tiny_sources[name]}", num_classes=0)
    else:
        model = AutoModel.from_pretrained(tiny_sources[name])
    assert lora_targets(model) == expected


def test_cnn_lora_targets_and_an_explicit_override(tiny_sources):
    import timm

    resnet = timm.create_model("test_resnet", num_classes=0)
    targets = lora_targets(resnet)
    assert "layer1.0.conv1" in targets and all(isinstance(resnet.get_submodule(t), torch.nn.Conv2d) for t in targets)
    model = FusionModel(config_for(tiny_sources, "timm_vit", image_lora_rank=2, image_lora_targets=["fc1"]))
    adapted = {key.split(".lora_A.")[0] for key in model.state_dict() if ".lora_A." in key}
    blocks = len(model.image_encoder.model.blocks)
    assert adapted == {f"image_encoder.model.blocks.{i}.mlp.fc1" for i in range(blocks)} and blocks > 1


# ----- gradient checkpointing -----


@pytest.mark.parametrize(
    "name,block", [("clip", "text_encoder.model.encoder.layers.0.mlp"), ("timm_vit", "image_encoder.model.blocks.0")]
)
def test_gradient_checkpointing_gives_the_same_gradients(tiny_sources, name, block):
    def step(checkpointing: bool) -> tuple[dict, int]:
        torch.manual_seed(0)
        model = FusionModel(config_for(tiny_sources, name, gradient_checkpointing=checkpointing)).train()
        calls = []  # (a pre-hook: a recomputation stops once it has what the backward pass needs)
        model.get_submodule(block).register_forward_pre_hook(lambda *_: calls.append(1))
        model(**batch()).loss.backward()
        return {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = step(False)
    checkpointed, checkpointed_calls = step(True)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the block ran again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, atol=1e-6, rtol=1e-5, msg=key)


# ----- layer-wise learning-rate decay -----


def test_layer_decay_scales_each_blocks_learning_rate(tiny_sources):
    config = config_for(tiny_sources, "vit", text_encoder="hf", text_model=str(tiny_sources["bert"]))
    model = FusionModel(config)
    optimizer = build_optimizer(model, TrainConfig(lr=0.5, encoder_lr=1.0, layer_decay=0.5))
    lr = {
        key: group["lr"]
        for group in optimizer.param_groups
        for p in group["params"]
        for key, q in model.named_parameters()
        if q is p
    }
    # 2 blocks each: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, after the blocks (ViT's final norm) 1
    assert lr["text_encoder.model.embeddings.word_embeddings.weight"] == 0.125
    assert lr["text_encoder.model.encoder.layer.0.attention.self.query.weight"] == 0.25
    assert lr["text_encoder.model.encoder.layer.1.output.dense.bias"] == 0.5
    assert lr["image_encoder.model.embeddings.patch_embeddings.projection.weight"] == 0.125
    assert lr["image_encoder.model.layers.1.mlp.fc2.weight"] == 0.5
    assert lr["image_encoder.model.layernorm.weight"] == 1.0
    assert lr["fusion.image.weight"] == lr["heads.topic.output.weight"] == 0.5  # new parts: --train.lr
    flat = build_optimizer(model, TrainConfig(lr=0.5, encoder_lr=1.0))
    assert sorted({group["lr"] for group in flat.param_groups}) == [0.5, 1.0]


def test_pretrained_parts_are_those_with_weights(tiny_sources):
    """A bare timm architecture trains from scratch (at lr); a dual encoder's matching head starts pretrained."""
    bare = FusionModel(config_for(tiny_sources, "timm_vit", image_model="test_resnet"))
    lrs = {group["lr"] for group in build_optimizer(bare, TrainConfig(lr=0.5, encoder_lr=1.0)).param_groups}
    assert lrs == {0.5}
    dual = FusionModel(config_for(tiny_sources, "clip"))
    optimizer = build_optimizer(dual, TrainConfig(lr=0.5, encoder_lr=1.0))
    head = {id(p) for p in dual.heads["pair"].parameters()}
    assert {group["lr"] for group in optimizer.param_groups if head & {id(p) for p in group["params"]}} == {1.0}


# ----- options -----


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.image_lora_rank", "4"], "--model.image_lora_rank needs a timm or hf image encoder"),
        (["--model.text_lora_rank", "4"], "--model.text_lora_rank needs an hf text encoder"),
        (["--model.image_encoder", "timm"], "--model.image_encoder timm needs --model.image_model"),
        (["--model.pretrained", "openai/clip"], "--model.pretrained must be clip:PATH_OR_ID, got 'openai/clip'"),
        (
            ["--model.pretrained", "clip:x", "--model.image_lora_rank", "2", "--model.freeze_image", "true"],
            "LoRA adapters train inside the encoder",
        ),
        (["--train.layer_decay", "0"], "--train.layer_decay must be in (0, 1], got 0.0"),
        (
            ["--model.pretrained", "clip:x", "--model.text_lora_rank", "2", "--train.cache_features", "true"],
            "--train.cache_features true needs fixed encoders",
        ),
        (["--data.crop_pct", "1.5"], "--data.crop_pct must be in (0, 1], got 1.5"),
        (["--model.text_pooling", "pooler"], "--model.text_pooling pooler needs an hf text encoder"),
    ],
)
def test_option_errors_name_the_option(args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        parse_args(["--data.path", "data", *args])


def test_cache_features_takes_true_false_or_unset():
    assert parse_args(["--data.path", "d"]).train.cache_features is None
    assert parse_args(["--data.path", "d", "--train.cache_features", "true"]).train.cache_features is True
    assert parse_args(["--data.path", "d", "--train.cache_features", "no"]).train.cache_features is False
