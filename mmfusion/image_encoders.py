"""Image encoders: a small CNN and torchvision backbones, all returning `EncoderOutput`.

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
IMAGE_ENCODERS = {"simple_cnn": SimpleCNN, **{name: TorchvisionEncoder for name in TORCHVISION_BACKBONES}}


def build_image_encoder(config: FusionConfig) -> nn.Module:
    if config.image_encoder not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image_encoder {config.image_encoder!r}; choose from {sorted(IMAGE_ENCODERS)}")
    if config.image_encoder == "simple_cnn":
        return SimpleCNN(config.image_widths, config.image_pooling)
    return TorchvisionEncoder(config.image_encoder, config.image_size, config.image_weights, config.image_pooling)
