"""Image encoders: small CNNs trained from scratch, torchvision backbones, any timm model and transformers vision
models, all returning `EncoderOutput` with the (height, width) grid of their tokens.

A CNN's tokens are its final feature map flattened to [B, H*W, C]; a ViT's are its patch tokens (class, register
and distillation tokens left out). CNNs also give their stage outputs for dense heads (`returns_maps`,
`forward(pixel_values, maps=True)`): simple_cnn every stage's (strides 2, 4, 8, ...), torchvision and timm CNNs
those from stride 4 on; ViTs give none, and dense heads read their tokens as one map. Every class is built by
`from_config(config, weights)`: `weights=False` builds the architecture alone, as `FusionModel.from_pretrained`
does before loading a checkpoint. Pretrained weights come from local files or the Hugging Face Hub cache;
torchvision weights only ever from a local file (`image_weights`).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from .adapters import add_lora, enable_gradient_checkpointing
from .config import FusionConfig
from .layers import EncoderOutput
from .pretrained import (
    DEFAULT_IMAGE_SIZE,
    copy_weights,
    hf_config,
    hf_model,
    load_hf_tower,
    resolve_pretrained,
    timm_has_weights,
    timm_source,
)


def _all_real(tokens: torch.Tensor) -> torch.Tensor:
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


def _feature_map_output(features: torch.Tensor, pooling: str = "mean") -> EncoderOutput:
    """Tokens are the flattened feature map; pooled is their mean, or their max (presence of small objects)."""
    tokens = features.flatten(2).transpose(1, 2)
    pooled = tokens.amax(1) if pooling == "max" else tokens.mean(1)
    return EncoderOutput(pooled=pooled, tokens=tokens, mask=_all_real(tokens), grid=tuple(features.shape[-2:]))


def stage_maps(layers: nn.Module, pixel_values: torch.Tensor, min_stride: int = 4) -> list[torch.Tensor]:
    """Run `layers` (a CNN's sequence of blocks) one at a time and keep the last output at each resolution from
    stride `min_stride` on: its stage outputs, finest first, the final output last (the same as `layers(x)`)."""
    x, maps = pixel_values, []
    for layer in layers:
        y = layer(x)
        finished = y.shape[-2:] != x.shape[-2:] and x is not pixel_values
        if finished and pixel_values.shape[-2] >= min_stride * x.shape[-2]:
            maps.append(x)
        x = y
    return [*maps, x]


def _with_maps(output: EncoderOutput, maps: list[torch.Tensor]) -> EncoderOutput:
    output.maps = maps
    return output


def token_grid(count: int, height: int, width: int, patch: int | None) -> tuple[tuple[int, int] | None, int]:
    """(grid, prefix): the patch grid of `count` transformer tokens for a height x width image and how many
    leading tokens are not patches (class, registers). Patch-merging models (Swin) downsample further: their grid
    is found from the token count alone."""
    if patch:
        rows, columns = height // patch, width // patch
        if 0 < rows * columns <= count:
            return (rows, columns), count - rows * columns
    factor = math.sqrt(height * width / count)
    rows, columns = round(height / factor), round(width / factor)
    return ((rows, columns), 0) if rows * columns == count else (None, 0)


def _prepare(model: nn.Module, lora_rank: int, lora_targets: list[str] | None, checkpointing: bool) -> None:
    """After the weights: LoRA adapters, then gradient checkpointing."""
    if lora_rank:
        add_lora(model, lora_rank, lora_targets)
    if checkpointing:
        enable_gradient_checkpointing(model)


class SimpleCNN(nn.Module):
    """Conv stages (3x3 conv, GroupNorm, ReLU, 2x2 max-pool), one per entry of `widths`."""

    def __init__(self, widths: list[int], pooling: str = "mean") -> None:
        super().__init__()
        self.pooling = pooling
        if not widths:
            raise ValueError("simple_cnn needs at least one stage in image_widths")
        stages, channels = [], 3
        for width in widths:
            stages += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.GroupNorm(min(8, width), width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*stages)
        self.out_dim = channels

    returns_maps = True

    @classmethod
    def from_config(cls, config: FusionConfig, weights: bool = True) -> SimpleCNN:
        return cls(config.image_widths, config.image_pooling)

    def forward(self, pixel_values: torch.Tensor, maps: bool = False) -> EncoderOutput:
        if not maps:
            return _feature_map_output(self.features(pixel_values), self.pooling)
        stages = stage_maps(self.features, pixel_values, min_stride=2)
        return _with_maps(_feature_map_output(stages[-1], self.pooling), stages)


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm: statistics per sample, so a sample's features never depend on the rest of its batch."""
    return nn.GroupNorm(min(8, channels), channels)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm, added to a shortcut (a strided 1x1 convolution where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            _group_norm(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _group_norm(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), _group_norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


RESIDUAL_PRESETS: dict[str, tuple[int, list[int], list[int]]] = {
    "cnn_small": (32, [32, 64, 128, 256], [1, 1, 1, 1]),
    "cnn_base": (32, [48, 96, 192, 384], [2, 2, 2, 2]),
}
"""Preset -> (stem width, width of each stage, residual blocks per stage)."""


class ResidualCNN(nn.Module):
    """A ResNet-style CNN for training from scratch on small images: a full-resolution 3x3 stem, then stages that
    each halve the resolution (the first block strided) and stack residual blocks; GroupNorm throughout.

    Four stages give 1/16 of the input side as the token grid (4x4 at 64 px, 14x14 at 224 px) and a receptive
    field of 93 px (cnn_small) or 213 px (cnn_base; simple_cnn: 22 px), so a token sees a whole object at 64-224 px.
    """

    def __init__(self, stem: int, widths: list[int], blocks: list[int], pooling: str = "mean") -> None:
        super().__init__()
        self.pooling = pooling
        layers: list[nn.Module] = [
            nn.Conv2d(3, stem, 3, padding=1, bias=False),
            _group_norm(stem),
            nn.ReLU(inplace=True),
        ]
        channels = stem
        for width, count in zip(widths, blocks, strict=True):
            for index in range(count):
                layers.append(ResidualBlock(channels, width, stride=2 if index == 0 else 1))
                channels = width
        self.features = nn.Sequential(*layers)
        self.out_dim = channels

    @classmethod
    def from_config(cls, config: FusionConfig, weights: bool = True) -> ResidualCNN:
        """The preset `config.image_encoder` names (random initialisation: there are no weights to load)."""
        stem, widths, blocks = RESIDUAL_PRESETS[config.image_encoder]
        return cls(stem, widths, blocks, config.image_pooling)

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        return _feature_map_output(self.features(pixel_values), self.pooling)


class TorchvisionEncoder(nn.Module):
    """A torchvision classification network without its classifier: feature map (or patch tokens) out."""

    def __init__(self, name: str, image_size: int, weights: str | None = None, pooling: str = "mean") -> None:
        super().__init__()
        self.pooling = pooling
        kwargs = {"image_size": image_size} if name.startswith("vit") else {}
        network = getattr(torchvision.models, name)(weights=None, **kwargs)
        if weights:
            load_backbone_weights(network, weights)
        self.is_vit = name.startswith("vit")
        self.returns_maps = not self.is_vit
        if self.is_vit:
            network.heads = nn.Identity()  # the classifier is never used
            self.vit = network
            self.out_dim = network.hidden_dim
        elif name.startswith("resnet"):
            self.features = nn.Sequential(*list(network.children())[:-2])
            self.out_dim = network.fc.in_features
        else:  # efficientnet, convnext: `.features` then a pooled classifier
            self.features = network.features
            self.out_dim = next(m for m in network.classifier.modules() if isinstance(m, nn.Linear)).in_features

    @classmethod
    def from_config(cls, config: FusionConfig, weights: bool = True) -> TorchvisionEncoder:
        size = config.image_size or DEFAULT_IMAGE_SIZE
        return cls(config.image_encoder, size, config.image_weights if weights else None, config.image_pooling)

    def forward(self, pixel_values: torch.Tensor, maps: bool = False) -> EncoderOutput:
        if not self.is_vit:
            if not maps:
                return _feature_map_output(self.features(pixel_values), self.pooling)
            stages = stage_maps(self.features, pixel_values)
            return _with_maps(_feature_map_output(stages[-1], self.pooling), stages)
        x = self.vit._process_input(pixel_values)
        x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.vit.encoder(x)
        tokens = x[:, 1:]
        grid, _ = token_grid(tokens.shape[1], *pixel_values.shape[-2:], self.vit.patch_size)
        return EncoderOutput(pooled=x[:, 0], tokens=tokens, mask=_all_real(tokens), grid=grid)


def load_backbone_weights(network: nn.Module, path: str) -> None:
    """Load a local torchvision state dict (safetensors, or a torch file read with weights_only=True)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"image_weights: no such file: {file}")
    if file.suffix == ".safetensors":
        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"image_weights {file} do not fit {type(network).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


class TimmImageEncoder(nn.Module):
    """Any timm model without its classifier: tokens from `forward_features` (a CNN's feature map, a ViT's patch
    tokens), pooled by the model's own head (`forward_head(pre_logits=True)`, what timm's classifier reads)."""

    def __init__(self, model_config: dict, image_size: int | None = None) -> None:
        super().__init__()
        import timm

        pretrained_cfg = model_config["pretrained_cfg"]
        kwargs = {k: v for k, v in (model_config.get("model_args") or {}).items() if k != "num_classes"}
        if image_size and pretrained_cfg.get("fixed_input_size"):  # ViT-like: positions are built for one size
            kwargs["img_size"] = image_size
        self.model_kwargs = kwargs
        self.model = timm.create_model(
            model_config["architecture"], pretrained=False, pretrained_cfg=pretrained_cfg, num_classes=0, **kwargs
        )
        self.is_vit = hasattr(self.model, "patch_embed")  # transformers tokenise with a patch embedding; CNNs don't
        self.returns_maps = not self.is_vit and hasattr(self.model, "forward_intermediates")
        self.channels_first = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NCHW")
        self.out_dim = self.model.num_features
        patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        self.patch = patch[0] if isinstance(patch, (tuple, list)) else patch

    @classmethod
    def from_config(cls, config: FusionConfig, weights: bool = True) -> TimmImageEncoder:
        config = resolve_pretrained(config)
        encoder = cls(config.image_model_config, config.image_size)
        if weights:
            encoder.load_source_weights(config.image_model, config.image_weights)
        _prepare(encoder.model, config.image_lora_rank, config.image_lora_targets, config.gradient_checkpointing)
        return encoder

    def load_source_weights(self, image_model: str, weights_file: str | None) -> None:
        """Weights from a local file, or those `image_model` names (Hub id, directory, pretrained tag); a bare
        architecture name keeps its random initialisation. timm adapts them (e.g. position embeddings resized)."""
        import timm

        if weights_file:
            if not Path(weights_file).is_file():
                raise FileNotFoundError(f"image_weights: no such file: {weights_file}")
            source = timm.create_model(
                self.model.pretrained_cfg["architecture"],
                pretrained=True,
                num_classes=0,
                pretrained_cfg_overlay={"file": str(weights_file)},
                **self.model_kwargs,
            )
        elif timm_has_weights(image_model):
            kwargs = {k: v for k, v in self.model_kwargs.items() if k == "img_size"}  # the rest come from the source
            source = timm.create_model(timm_source(image_model), pretrained=True, num_classes=0, **kwargs)
        else:
            return
        copy_weights(self.model, source, f"timm weights of {weights_file or image_model}")

    def forward(self, pixel_values: torch.Tensor, maps: bool = False) -> EncoderOutput:
        if maps and self.returns_maps:
            features, stages = self.model.forward_intermediates(pixel_values, output_fmt="NCHW")
        else:
            features, stages = self.model.forward_features(pixel_values), None
        pooled = self.model.forward_head(features, pre_logits=True)
        if features.ndim == 4:  # a feature map
            if not self.channels_first:
                features = features.permute(0, 3, 1, 2)
            grid, tokens = tuple(features.shape[-2:]), features.flatten(2).transpose(1, 2)
        else:
            grid, prefix = token_grid(features.shape[1], *pixel_values.shape[-2:], self.patch)
            tokens = features[:, prefix:]
        if pooled.shape[-1] != tokens.shape[-1]:  # a head that changes the width: pool the tokens instead
            pooled = tokens.mean(1)
        output = EncoderOutput(pooled=pooled, tokens=tokens, mask=_all_real(tokens), grid=grid)
        if stages is None:
            return output
        # Stage outputs from stride 4 on and finer than the final map, which comes last.
        size = pixel_values.shape[-2]
        finer = [m for m in stages if size >= 4 * m.shape[-2] and m.shape[-2] > features.shape[-2]]
        return _with_maps(output, [*finer, features])


class HFImageEncoder(nn.Module):
    """A transformers vision model (ViT, DeiT, DINOv2, ConvNeXt, Swin, or a CLIP/SigLIP vision tower): tokens are
    its last hidden state's patch tokens (a CNN's feature map flattened); pooled is the model's own pooled output
    (CLIP: the normalised class token, SigLIP: its attention head, DINOv2: the class token, ConvNeXt/Swin: the
    mean), or the class token where the pooler is a dense layer trained for another task (ViT, DeiT)."""

    def __init__(self, model_config: dict, image_size: int | None = None) -> None:
        super().__init__()
        vision = hf_config(model_config, "vision")
        self.model = hf_model(model_config, "vision")
        pooler = getattr(self.model, "pooler", None)
        self.class_token_pooling = pooler is not None and any(True for _ in pooler.parameters())
        if self.class_token_pooling:
            self.model.pooler = None  # unused, and unused parameters upset DDP
        self.is_vit = True  # channels_last is left to CNNs with plain convolutions
        sizes = getattr(vision, "hidden_sizes", None)
        self.out_dim = sizes[-1] if sizes else vision.hidden_size
        self.patch = getattr(vision, "patch_size", None)
        native = getattr(vision, "image_size", None)
        accepts = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self.forward_kwargs = {"interpolate_pos_encoding": True} if accepts and image_size != native else {}

    @classmethod
    def from_config(cls, config: FusionConfig, weights: bool = True) -> HFImageEncoder:
        config = resolve_pretrained(config)
        encoder = cls(config.image_model_config, config.image_size)
        if weights:
            source = load_hf_tower(config.image_model, "vision")
            copy_weights(encoder.model, source, f"image_model {config.image_model}")
        _prepare(encoder.model, config.image_lora_rank, config.image_lora_targets, config.gradient_checkpointing)
        return encoder

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        output = self.model(pixel_values=pixel_values, **self.forward_kwargs)
        hidden = output.last_hidden_state
        if hidden.ndim == 4:  # a CNN's feature map
            grid, tokens = tuple(hidden.shape[-2:]), hidden.flatten(2).transpose(1, 2)
        else:
            grid, prefix = token_grid(hidden.shape[1], *pixel_values.shape[-2:], self.patch)
            tokens = hidden[:, prefix:]
        pooled = hidden[:, 0] if self.class_token_pooling else output.pooler_output.flatten(1)
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=_all_real(tokens), grid=grid)


TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16")
IMAGE_ENCODERS = {
    "simple_cnn": SimpleCNN,
    **{name: ResidualCNN for name in RESIDUAL_PRESETS},
    **{name: TorchvisionEncoder for name in TORCHVISION_BACKBONES},
    "timm": TimmImageEncoder,
    "hf": HFImageEncoder,
}


def build_image_encoder(config: FusionConfig, weights: bool = True) -> nn.Module:
    """The configured image encoder; `weights=False`: its architecture only (no pretrained weights read)."""
    if config.image_encoder not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image_encoder {config.image_encoder!r}; choose from {sorted(IMAGE_ENCODERS)}")
    return IMAGE_ENCODERS[config.image_encoder].from_config(config, weights)
