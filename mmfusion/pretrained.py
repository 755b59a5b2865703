"""Pretrained sources: what timm and transformers models say about themselves, read once.

`resolve_pretrained(config)` turns the names a user gives (`--model.image_model`, `--model.text_model`,
`--model.pretrained clip:...`) into a config that rebuilds the encoders without the original files (their
architecture configs, the image size); `train.py` calls it before anything is built and the checkpoint stores the
result. `image_settings_for` / `text_settings_for` give the processor the model's own preprocessing (input size,
mean/std, resampling, crop; text length and padding). Weights are loaded by the encoders themselves.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DataConfig, FusionConfig
from .processing import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_IMAGE_SIZE = 64
DUAL_PREFIX = "clip:"


def dual_source(config: FusionConfig) -> str | None:
    """The CLIP/SigLIP model named by `--model.pretrained clip:PATH_OR_ID`, if any."""
    if config.pretrained is None:
        return None
    if not config.pretrained.startswith(DUAL_PREFIX) or len(config.pretrained) == len(DUAL_PREFIX):
        raise ValueError(f"pretrained must be clip:PATH_OR_ID, got {config.pretrained!r}")
    return config.pretrained[len(DUAL_PREFIX) :]


def resolve_pretrained(config: FusionConfig) -> FusionConfig:
    """`config` with what the pretrained sources say filled in; `config` itself when there is nothing to fill.

    `pretrained clip:X` makes both encoders `hf` towers of X with its pooled outputs; timm and hf encoders get
    their architecture config (`image_model_config`, `text_model_config`) and an unset `image_size` their own
    input size. Values already there (a checkpoint's) are kept, so a resolved config never reads a source again.
    Task specs are shared with `config`, not copied."""
    changes: dict[str, Any] = {}
    source = dual_source(config)
    if source is not None:
        changes = dict(image_encoder="hf", text_encoder="hf", image_model=source, text_model=source)
        changes["text_pooling"] = "pooler"  # what the source's text projection reads
    resolved = dataclasses.replace(config, **changes) if changes else config
    changes = {}
    if resolved.image_encoder == "timm" and resolved.image_model_config is None:
        changes["image_model_config"] = timm_model_config(_required(resolved.image_model, "image_model"))
    if resolved.image_encoder == "hf" and resolved.image_model_config is None:
        changes["image_model_config"] = hf_model_config(_required(resolved.image_model, "image_model"))
    if resolved.text_encoder == "hf" and resolved.text_model_config is None:
        changes["text_model_config"] = hf_model_config(_required(resolved.text_model, "text_model"))
    if changes:
        resolved = dataclasses.replace(resolved, **changes)
    if resolved.image_size is None:
        resolved = dataclasses.replace(resolved, image_size=native_image_size(resolved))
    return resolved


def _required(value: str | None, name: str) -> str:
    if not value:
        raise ValueError(f"{name} is required: a model name, local path or Hub id")
    return value


# ----- timm -----


def timm_source(image_model: str) -> str:
    """The name timm's create_model takes: a local directory becomes `local-dir:PATH`."""
    if Path(image_model).is_dir():
        return f"local-dir:{Path(image_model).resolve()}"
    return image_model


def timm_model_config(image_model: str) -> dict[str, Any]:
    """{architecture, model_args, pretrained_cfg} of a timm name, `hf-hub:` id or local directory (config.json)."""
    from timm.models import PretrainedCfg, load_model_config_from_hf, resolve_pretrained_cfg
    from timm.models._factory import parse_model_name
    from timm.models._hub import load_model_config_from_path
    from timm.models._registry import is_model, split_model_name_tag

    kind, model_id = parse_model_name(timm_source(image_model))
    if kind == "hf-hub":
        pretrained_cfg, architecture, model_args = load_model_config_from_hf(model_id)
    elif kind == "local-dir":
        pretrained_cfg, architecture, model_args = load_model_config_from_path(model_id)
    else:
        architecture, tag = split_model_name_tag(model_id)
        if not is_model(architecture):
            raise ValueError(f"image_model {image_model!r} is not a timm architecture (see timm.list_models())")
        pretrained_cfg, model_args = resolve_pretrained_cfg(architecture, pretrained_cfg=tag or None).to_dict(), {}
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    pretrained_cfg = {k: v for k, v in dict(pretrained_cfg).items() if k in fields}
    return {"architecture": architecture, "model_args": dict(model_args or {}), "pretrained_cfg": pretrained_cfg}


def timm_has_weights(image_model: str) -> bool:
    """Whether a timm name carries weights: a Hub id, a directory or a pretrained tag (not a bare architecture)."""
    from timm.models._factory import parse_model_name

    kind, model_id = parse_model_name(timm_source(image_model))
    return kind is not None or "." in model_id


def _timm_image_settings(model_config: dict[str, Any]) -> dict[str, Any]:
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=model_config["pretrained_cfg"])
    size = model_config["model_args"].get("img_size") or data["input_size"][-1]  # built for a size: that one
    return {
        "image_size": int(size if isinstance(size, int) else size[-1]),
        "mean": tuple(data["mean"]),
        "std": tuple(data["std"]),
        "interpolation": data["interpolation"] if data["interpolation"] != "random" else "bilinear",
        "resize": "squash" if data.get("crop_mode") == "squash" else "shortest_edge",
        "crop_pct": float(data["crop_pct"]),
    }


# ----- transformers -----


def hf_model_config(source: str) -> dict[str, Any]:
    """The transformers config of a local path or Hub id (read from the Hub cache when offline)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source).to_dict()


def hf_config(values: dict[str, Any], part: str | None = None):
    """A stored config dict as a transformers config; `part` ("vision" or "text") picks a dual model's tower."""
    from transformers import AutoConfig

    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    tower = getattr(config, f"{part}_config", None) if part else None
    return tower if tower is not None else config


def hf_model(values: dict[str, Any], part: str) -> nn.Module:
    """A randomly initialised transformers model from a stored config dict; of a dual model (CLIP, SigLIP) its
    `part` tower ("vision" or "text"), the class the dual model itself builds it with (CLIPModel: CLIPVisionModel;
    not every tower is registered with AutoModel)."""
    import sys

    from transformers import AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = hf_config(values)
    tower = getattr(config, f"{part}_config", None)
    if tower is None:
        return AutoModel.from_config(config)
    dual_class = MODEL_MAPPING[type(config)]
    name = f"{dual_class.__name__.removesuffix('Model')}{part.capitalize()}Model"
    tower_class = getattr(sys.modules[dual_class.__module__], name, None)
    if tower_class is None:
        raise ValueError(f"{dual_class.__name__} has no {name} for its {part} tower")
    return tower_class._from_config(tower)


def _hf_image_settings(source: str) -> dict[str, Any] | None:
    """The image processor's settings (preprocessor_config.json), or None when the model has none."""
    from PIL import Image
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except OSError:
        return None
    size, crop = processor.size, getattr(processor, "crop_size", None)
    shortest = getattr(size, "shortest_edge", None)
    resized = shortest or size.height
    image_size, crop_pct, resize = resized, 1.0, "shortest_edge" if shortest else "squash"
    convnext_crop = getattr(processor, "crop_pct", None)
    if getattr(processor, "do_center_crop", False) and crop is not None and crop.height:
        image_size, crop_pct = crop.height, crop.height / resized  # resize, then crop the center
    elif shortest and convnext_crop:  # ConvNeXt: below 384 resize to size/crop_pct and crop; else squash
        crop_pct, resize = (convnext_crop, resize) if shortest < 384 else (1.0, "squash")
    normalise = getattr(processor, "do_normalize", True)
    return {
        "image_size": int(image_size),
        "mean": tuple(processor.image_mean) if normalise else (0.0, 0.0, 0.0),
        "std": tuple(processor.image_std) if normalise else (1.0, 1.0, 1.0),
        "interpolation": Image.Resampling(int(processor.resample)).name.lower(),
        "resize": resize,
        "crop_pct": float(crop_pct),
    }


# ----- what the processor takes -----


def native_image_size(config: FusionConfig) -> int:
    """The image encoder's own input side: timm's data config, the hf image processor's (or config's), else 64."""
    if config.image_encoder == "timm":
        return _timm_image_settings(config.image_model_config)["image_size"]
    if config.image_encoder == "hf":
        settings = _hf_image_settings(config.image_model)
        if settings:
            return settings["image_size"]
        return int(getattr(hf_config(config.image_model_config, "vision"), "image_size", 224))
    return DEFAULT_IMAGE_SIZE


def image_settings_for(model: FusionConfig, data: DataConfig) -> dict[str, Any]:
    """ProcessorSettings image fields: the encoder's own preprocessing (timm data config, hf image processor),
    ImageNet statistics and a squashing bilinear resize otherwise; `--model.image_size` and the `--data` image
    options override. `model` must be resolved (see `resolve_pretrained`)."""
    settings = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", resize="squash", crop_pct=1.0)
    if model.image_encoder == "timm":
        settings.update(_timm_image_settings(model.image_model_config))
    elif model.image_encoder == "hf":
        settings.update(_hf_image_settings(model.image_model) or {})
    settings["image_size"] = model.image_size or settings.get("image_size", DEFAULT_IMAGE_SIZE)
    overrides = dict(mean=data.image_mean, std=data.image_std, interpolation=data.interpolation, crop_pct=data.crop_pct)
    settings.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})
    settings["crop_scale"] = (data.crop_area, 1.0)
    return settings


def text_settings_for(model: FusionConfig, data: DataConfig) -> dict[str, Any]:
    """ProcessorSettings text fields. hf: at most the model's positions; SigLIP text towers read a fixed-length
    sequence (their pooled vector is the last position), so their texts are padded to the model's length."""
    settings: dict[str, Any] = {"max_text_length": data.max_text_length, "pad_to_max_length": False}
    if model.text_encoder == "hf" and model.text_model_config is not None:
        text = hf_config(model.text_model_config, "text")
        positions = getattr(text, "max_position_embeddings", None)
        if text.model_type.startswith("siglip"):
            settings.update(max_text_length=positions, pad_to_max_length=True)
        elif positions:
            settings["max_text_length"] = min(data.max_text_length, positions)
    return settings


# ----- weights -----


def copy_weights(target: nn.Module, source: nn.Module, where: str) -> None:
    """Load `source`'s weights into `target`; every target tensor must be there (a source's extra heads, such as
    a classifier or an unused pooler, are left out)."""
    missing, _ = target.load_state_dict(source.state_dict(), strict=False)
    if missing:
        raise ValueError(f"{where}: the weights lack {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def load_hf_tower(source: str, part: str) -> nn.Module:
    """The transformers model at `source` (path or Hub id), or its `part` tower ("vision" or "text") when it is a
    dual model such as CLIP."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(source)
    tower = getattr(model, f"{part}_model", None)
    return model if tower is None else tower


@torch.no_grad()
def init_matching_head(head: nn.Module, source: nn.Module) -> None:
    """Start a matching head where the dual model's zero-shot scores are: its projections (CLIP) or the identity
    (SigLIP: the towers' pooled outputs are the embeddings), its temperature and logit bias."""
    for linear, projection in ((head.image, "visual_projection"), (head.text, "text_projection")):
        weight = getattr(source, projection, None)
        if weight is not None:
            linear.weight.copy_(weight.weight)
        else:
            linear.weight.copy_(torch.eye(*linear.weight.shape))
        linear.bias.zero_()
    head.logit_scale.copy_(source.logit_scale.reshape(1))
    bias = getattr(source, "logit_bias", None)
    head.logit_bias.copy_(bias.reshape(1) if bias is not None else torch.zeros(1))


def matching_dim(config: FusionConfig, in_dims: dict[str, int]) -> int:
    """Width of a dual model's matching space: its projection_dim (CLIP), else the towers' common width (SigLIP)."""
    values = config.image_model_config or {}
    if values.get("projection_dim"):
        return int(values["projection_dim"])
    if in_dims["image"] != in_dims["text"]:
        raise ValueError(
            f"pretrained {config.pretrained}: the towers' widths differ ({in_dims}) and the model has no projection_dim"
        )
    return in_dims["image"]
