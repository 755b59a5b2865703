"""Image encoders: small CNNs trained from scratch and torchvision backbones, all returning `EncoderOutput`.

A CNN's tokens are its final feature map flattened to [B, H*W, C]; a ViT's are its patch tokens.
Pretrained weights only ever come from a local file (`image_weights`): nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from .config import FusionConfig
from .layers import EncoderOutput


def _feature_map_output(features: torch.Tensor, pooling: str = "mean") -> EncoderOutput:
    """Tokens are the flattened feature map; pooled is their mean, or their max (presence of small objects)."""
    tokens = features.flatten(2).transpose(1, 2)
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    pooled = tokens.amax(1) if pooling == "max" else tokens.mean(1)
    return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)


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

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        return _feature_map_output(self.features(pixel_values), self.pooling)


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

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        if not self.is_vit:
            return _feature_map_output(self.features(pixel_values), self.pooling)
        x = self.vit._process_input(pixel_values)
        x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.vit.encoder(x)
        tokens = x[:, 1:]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(pooled=x[:, 0], tokens=tokens, mask=mask)


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


TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16")
IMAGE_ENCODERS = {
    "simple_cnn": SimpleCNN,
    **{name: ResidualCNN for name in RESIDUAL_PRESETS},
    **{name: TorchvisionEncoder for name in TORCHVISION_BACKBONES},
}


def build_image_encoder(config: FusionConfig) -> nn.Module:
    if config.image_encoder not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image_encoder {config.image_encoder!r}; choose from {sorted(IMAGE_ENCODERS)}")
    encoder = IMAGE_ENCODERS[config.image_encoder]
    if hasattr(encoder, "from_config"):
        return encoder.from_config(config)
    if config.image_encoder == "simple_cnn":
        return SimpleCNN(config.image_widths, config.image_pooling)
    return TorchvisionEncoder(config.image_encoder, config.image_size, config.image_weights, config.image_pooling)
