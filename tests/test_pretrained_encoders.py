"""timm and transformers image encoders, CLIP/SigLIP dual encoders: the source library's own features, its own
preprocessing, zero-shot matching before any training step, and checkpoints that rebuild without the sources.

Sources are tiny random models saved as their libraries publish them (conftest.tiny_sources); Hub ids are read from
a fake offline Hub cache. Encoders are built after re-seeding, so equal outputs mean the weights were loaded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_predictor import fake_hub_cache, go_offline
from test_train import _run
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from mmfusion import Config, FusionConfig, FusionModel, Predictor, TaskSpec
from mmfusion.config import DataConfig
from mmfusion.image_encoders import build_image_encoder
from mmfusion.prepare import build_processor
from mmfusion.pretrained import image_settings_for, resolve_pretrained, text_settings_for
from mmfusion.processing import FusionProcessor, ProcessorSettings, train_tokenizer
from mmfusion.rows import Collator

TASKS = [TaskSpec("topic", labels=["cat", "dog", "bird"]), TaskSpec("pair", "matching")]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TEXTS = ["a photo of a cat", "two dog in the park on the mat", "a blue bird"]


def image_config(encoder: str, model, **extra) -> FusionConfig:
    values = dict(text_dim=8, vocab_size=30, dim=16, fusion_heads=2, dropout=0.0, tasks=TASKS)
    return FusionConfig(image_encoder=encoder, image_model=str(model), **{**values, **extra})


def random_image(seed: int, size=(70, 45)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def build_encoder(config: FusionConfig):
    torch.manual_seed(123)  # not the sources' seed: equal features below mean the source's weights were loaded
    return build_image_encoder(resolve_pretrained(config)).eval()


# ----- timm -----


@pytest.mark.parametrize(
    "source,size,grid",
    [("timm_vit", 32, (2, 2)), ("timm_resnet", 64, (2, 2)), ("timm_resnet", 96, (3, 3))],
)
def test_timm_encoder_gives_timms_own_features(tiny_sources, source, size, grid):
    directory = tiny_sources[source]
    reference = timm.create_model(f"local-dir:{directory}", pretrained=True, num_classes=0).eval()
    encoder = build_encoder(image_config("timm", directory, image_size=size))
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out, features, pooled = encoder(pixels), reference.forward_features(pixels), reference(pixels)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    if features.ndim == 4:  # a CNN: its feature map, row by row
        expected = features.flatten(2).transpose(1, 2)
    else:  # a ViT: its patch tokens, after the class token
        expected = features[:, reference.num_prefix_tokens :]
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-5)
    assert out.grid == grid and out.mask.all() and out.tokens.shape[1] == grid[0] * grid[1]
    assert encoder.out_dim == reference.num_features == out.tokens.shape[-1]


@pytest.mark.parametrize("name", ["hf-hub:timm/test_resnet.r160_in1k", "test_resnet.r160_in1k", "weights file"])
def test_timm_weights_from_the_hub_cache_or_a_file_offline(tiny_sources, tmp_path, monkeypatch, name):
    source = tiny_sources["timm_resnet"]
    fake_hub_cache(go_offline(monkeypatch, tmp_path / "hf"), "timm/test_resnet.r160_in1k", source)
    extra = {}
    if name == "weights file":  # a bare architecture name and a local weights file
        name, extra = "test_resnet", {"image_weights": str(source / "model.safetensors")}
    encoder = build_encoder(image_config("timm", name, **extra))
    reference = timm.create_model(f"local-dir:{source}", pretrained=True, num_classes=0).state_dict()
    assert {k: v for k, v in encoder.model.state_dict().items()}.keys() == reference.keys()
    assert all(torch.equal(encoder.model.state_dict()[k], v) for k, v in reference.items())


def test_a_bare_timm_architecture_starts_from_random_weights(tiny_sources):
    encoder = build_encoder(image_config("timm", "test_resnet"))
    reference = timm.create_model(f"local-dir:{tiny_sources['timm_resnet']}", pretrained=True, num_classes=0)
    assert not torch.equal(encoder.model.conv1[0].weight, reference.conv1[0].weight)


# ----- transformers vision models -----


@pytest.mark.parametrize(
    "source,prefix,grid",
    [
        ("vit", 1, (4, 4)),  # class token, then 4x4 patches of 8 px; pooled: the class token (ViT's pooler is unused)
        ("dinov2", 1, (4, 4)),
        ("convnext", 0, (4, 4)),  # a feature map (a stride-4 stem, then one downsampling stage)
        ("swin", 0, (4, 4)),  # patches of 4 px merged once
        ("clip", 1, (4, 4)),  # the vision tower of a dual model
        ("siglip", 0, (4, 4)),
    ],
)
def test_hf_vision_encoder_gives_the_models_own_features(tiny_sources, source, prefix, grid):
    reference = AutoModel.from_pretrained(tiny_sources[source])
    reference = getattr(reference, "vision_model", reference).eval()
    encoder = build_encoder(image_config("hf", tiny_sources[source]))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, expected = encoder(pixels), reference(pixel_values=pixels)
    hidden = expected.last_hidden_state
    tokens = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden[:, prefix:]
    pooled = hidden[:, 0] if source == "vit" else expected.pooler_output
    torch.testing.assert_close(out.tokens, tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=1e-5)
    assert out.grid == grid and out.tokens.shape[1] == grid[0] * grid[1] and encoder.out_dim == tokens.shape[-1]


def test_hf_vision_model_from_a_hub_id_offline(tiny_sources, tmp_path, monkeypatch):
    fake_hub_cache(go_offline(monkeypatch, tmp_path / "hf"), "someone/tiny-vit", tiny_sources["vit"])
    encoder = build_encoder(image_config("hf", "someone/tiny-vit"))
    reference = AutoModel.from_pretrained(tiny_sources["vit"]).state_dict()
    assert all(torch.equal(encoder.model.state_dict()[k], reference[k]) for k in encoder.model.state_dict())


# ----- the processor takes the model's own preprocessing -----


def test_processor_settings_come_from_the_encoders_data_config(tiny_sources):
    data = DataConfig()
    resnet = resolve_pretrained(image_config("timm", tiny_sources["timm_resnet"]))
    assert resnet.image_size == 160
    assert image_settings_for(resnet, data) == {
        "image_size": 160,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bilinear",
        "resize": "shortest_edge",
        "crop_pct": 0.95,
        "crop_scale": (0.8, 1.0),
    }
    clip = resolve_pretrained(image_config("hf", tiny_sources["clip"]))
    assert image_settings_for(clip, data) == {
        "image_size": 32,
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "interpolation": "bicubic",
        "resize": "shortest_edge",
        "crop_pct": 1.0,
        "crop_scale": (0.8, 1.0),
    }
    overridden = DataConfig(
        image_mean=[0.1, 0.2, 0.3], image_std=[1, 1, 1], interpolation="nearest", crop_pct=0.5, crop_area=0.6
    )
    settings = image_settings_for(
        resolve_pretrained(image_config("hf", tiny_sources["clip"], image_size=48)), overridden
    )
    assert settings == {
        "image_size": 48,
        "mean": (0.1, 0.2, 0.3),
        "std": (1, 1, 1),
        "interpolation": "nearest",
        "resize": "shortest_edge",
        "crop_pct": 0.5,
        "crop_scale": (0.6, 1.0),
    }
    plain = image_settings_for(resolve_pretrained(image_config("simple_cnn", None)), data)
    assert plain["image_size"] == 64 and plain["resize"] == "squash" and plain["interpolation"] == "bilinear"


@pytest.mark.parametrize("source", ["clip", "timm_resnet"])
def test_processor_pixels_equal_the_source_librarys_transform(tiny_sources, source):
    """A 70x45 image: resized by its shortest edge, center-cropped, normalised exactly as the library does it
    (transformers' PIL image processor, timm's evaluation transform)."""
    encoder = "timm" if source.startswith("timm") else "hf"
    settings = image_settings_for(resolve_pretrained(image_config(encoder, tiny_sources[source])), DataConfig())
    processor = FusionProcessor(train_tokenizer(["a b"]), ProcessorSettings(**settings))
    image = random_image(0)
    if encoder == "hf":
        transform = AutoImageProcessor.from_pretrained(tiny_sources[source], use_fast=False)
        expected = transform(image, return_tensors="pt")["pixel_values"][0]
    else:
        model = timm.create_model(f"local-dir:{tiny_sources[source]}")
        expected = timm.data.create_transform(**timm.data.resolve_model_data_config(model))(image)
    torch.testing.assert_close(processor.image_tensor(image), expected, atol=1e-5, rtol=0)


def test_siglip_texts_are_padded_to_the_models_length(tiny_sources):
    data = DataConfig(max_text_length=64)
    siglip = resolve_pretrained(FusionConfig(pretrained=f"clip:{tiny_sources['siglip']}", tasks=TASKS))
    clip = resolve_pretrained(FusionConfig(pretrained=f"clip:{tiny_sources['clip']}", tasks=TASKS))
    assert text_settings_for(siglip, data) == {"max_text_length": 16, "pad_to_max_length": True}
    assert text_settings_for(clip, data) == {"max_text_length": 16, "pad_to_max_length": False}  # its positions


# ----- dual encoders -----


def test_pretrained_clip_sets_both_towers_and_pooling(tiny_sources):
    source = str(tiny_sources["clip"])
    config = resolve_pretrained(FusionConfig(pretrained=f"clip:{source}", text_pooling="mean", tasks=TASKS))
    assert config.image_encoder == config.text_encoder == "hf" and config.image_model == config.text_model == source
    assert config.text_pooling == "pooler" and config.image_model_config["model_type"] == "clip"
    with pytest.raises(ValueError, match="pretrained must be clip:PATH_OR_ID, got 'siglip:x'"):
        resolve_pretrained(FusionConfig(pretrained="siglip:x", tasks=TASKS))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_untrained_matching_logits_equal_the_dual_models(tiny_sources, kind):
    """Through mmfusion's own processor (tokenizer, padding rules, image transform) and model."""
    directory = tiny_sources[kind]
    config = Config(model=FusionConfig(pretrained=f"clip:{directory}", tasks=TASKS, dim=16, fusion="gated"))
    config.model = resolve_pretrained(config.model)
    processor, _ = build_processor(config, loaded=None)
    torch.manual_seed(123)
    model = FusionModel(config.model_config()).eval()
    row = {"pixel_values": torch.zeros(1), "image_present": True, "text_present": True, "labels": {}, "label_mask": {}}
    batch = Collator(processor.settings.pad_id)(
        [{**row, "input_ids": processor.encode_text(t), "row": 0} for t in TEXTS]
    )
    pixels = torch.stack([processor.image_tensor(random_image(i)) for i in range(len(TEXTS))])
    source = AutoModel.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    padding = {"padding": "max_length", "max_length": 16} if kind == "siglip" else {"padding": True}
    tokens = tokenizer(TEXTS, return_tensors="pt", **padding)
    assert torch.equal(tokens["input_ids"], batch["input_ids"])  # the model's tokenizer, as the model expects it
    with torch.no_grad():
        expected = source(
            input_ids=tokens["input_ids"],
            pixel_values=pixels,
            attention_mask=tokens["attention_mask"] if kind == "clip" else None,
        ).logits_per_image
        logits = model(pixel_values=pixels, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(logits.logits["pair"], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the image tokens' grid survives the placeholder step, for heads that rebuild maps
        assert model.encode(pixels, batch["input_ids"], batch["attention_mask"])["image"].grid == (4, 4)
    head = model.heads["pair"]
    assert float(head.logit_bias.detach()) == (-1.5 if kind == "siglip" else 0.0)


# ----- checkpoints rebuild without the sources -----


@pytest.mark.parametrize(
    "name,options",
    [
        ("timm_vit", {"image_encoder": "timm"}),
        ("swin", {"image_encoder": "hf", "fusion": "cross_attention"}),
        ("clip", {"pretrained": "clip"}),
        ("siglip", {"pretrained": "clip", "image_lora_rank": 2, "text_lora_rank": 2}),
        ("clip", {"pretrained": "clip", "image_lora_rank": 2, "lora_save": "merged"}),
    ],
)
def test_checkpoint_rebuilds_and_predicts_without_the_source(tiny_sources, tmp_path, name, options):
    source = shutil.copytree(tiny_sources[name], tmp_path / "source")
    options = dict(options)
    if options.pop("pretrained", None):
        options["pretrained"] = f"clip:{source}"
    else:
        options["image_model"] = str(source)
    config = Config(model=FusionConfig(**{**dict(text_dim=8, dim=16, fusion_heads=2, tasks=TASKS), **options}))
    config.model = resolve_pretrained(config.model)
    processor = build_processor(config, loaded=None)[0] if config.model.text_encoder == "hf" else None
    if processor is None:
        settings = ProcessorSettings(**image_settings_for(config.model, config.data))
        processor = FusionProcessor(train_tokenizer(TEXTS), settings)
        config.model.vocab_size = processor.vocab_size
    model = FusionModel(config.model_config())
    with torch.no_grad():  # adapters start as a no-op; move them so that a lost adapter would show
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "checkpoint")
    processor.save_pretrained(tmp_path / "checkpoint")
    images = [random_image(i) for i in range(3)]
    expected = Predictor(model, processor, device="cpu").predict(images, TEXTS)
    shutil.rmtree(source)
    loaded = Predictor.from_pretrained(str(tmp_path / "checkpoint"), device="cpu")
    assert_same_predictions(loaded.predict(images, TEXTS), expected)
    merged = options.get("lora_save") == "merged"
    assert loaded.model.config.image_lora_rank == (0 if merged else options.get("image_lora_rank", 0))


def assert_same_predictions(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for row, reference in zip(got, expected):
        assert row["topic"]["label"] == reference["topic"]["label"]
        assert row["topic"]["scores"] == pytest.approx(reference["topic"]["scores"], abs=1e-5)
        assert row["pair"]["score"] == pytest.approx(reference["pair"]["score"], abs=1e-5)


def test_train_py_fine_tunes_clip_with_lora_and_timm_with_minilm_style_text(tiny_sources, tmp_path):
    """The two recipes' shapes, end to end for two steps: CLIP with LoRA adapters on both towers, and a timm image
    encoder with a transformers text encoder fused by cross-attention."""
    from helpers import make_imagefolder, make_rows

    make_imagefolder(tmp_path / "data", {"train": make_rows(12), "validation": make_rows(4, 100)})
    common = ["--data.path", str(tmp_path / "data"), *"--train.max_steps 2 --train.batch_size 4 --model.dim 16".split()]
    common += ["--train.report", "false"]
    runs = {
        "clip": ["--model.pretrained", f"clip:{tiny_sources['clip']}"]
        + "--model.image_lora_rank 2 --model.text_lora_rank 2 --train.layer_decay 0.8".split(),
        "timm": ["--model.image_model", str(tiny_sources["timm_vit"]), "--model.text_model", str(tiny_sources["bert"])]
        + "--model.image_encoder timm --model.text_encoder hf --model.fusion cross_attention".split()
        + "--model.fusion_heads 2 --model.gradient_checkpointing true".split(),
    }
    for name, options in runs.items():
        assert _run([*common, *options, "--train.output_dir", str(tmp_path / name)]) == 0
        predictor = Predictor.from_pretrained(str(tmp_path / name / "final"), device="cpu")
        assert predictor.processor.settings.image_size == 32
        predictions = predictor.predict([random_image(0)], ["a red picture"])
        assert set(predictions[0]) == {"label", "score", "tags"}


def test_recipes_name_their_pretrained_sources():
    """The two recipes parse; test_train_py_fine_tunes_* runs their options on tiny stand-in sources."""
    from pathlib import Path

    from mmfusion.options import parse_args

    configs = Path(__file__).resolve().parents[1] / "configs"
    timm_recipe = parse_args(["--config", str(configs / "timm_minilm_cross_attention.yaml")])
    assert (timm_recipe.model.image_encoder, timm_recipe.model.image_model) == (
        "timm",
        "hf-hub:timm/convnext_tiny.fb_in22k_ft_in1k",
    )
    assert timm_recipe.model.fusion == "cross_attention" and timm_recipe.train.layer_decay == 0.8
    clip_recipe = parse_args(["--config", str(configs / "clip_finetune_lora.yaml")])
    assert clip_recipe.model.pretrained == "clip:openai/clip-vit-base-patch32"
    assert (clip_recipe.model.image_lora_rank, clip_recipe.model.text_lora_rank) == (8, 8)
    assert {task.type for task in clip_recipe.tasks} >= {"matching"}
