"""Dense heads: a light FPN-like decoder from the image encoder's feature maps to a map per image, conditioned on
the fused representation, so the same image gives different maps for different texts.

The decoder starts at the coarsest feature map and works towards the finest: each stage upsamples, adds the next
finer map (a skip connection through a 1x1 lateral convolution), then a 3x3 convolution, group norm and FiLM from
the fused vector (Perez et al. 2018). An encoder with one map (a ViT's patch tokens) gets upsampling stages
instead, down to stride 4 (or the task's output stride). With `cross_attention` fusion the coarsest stage's
positions also attend to the text tokens (a zero-gated block, so it starts as the identity). The logits are
upsampled bilinearly to the input size / `output_stride`; `depths` put output layers on earlier stages (deep
supervision, training only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionConfig, TaskSpec
from .layers import Block, EncoderOutput, feature_maps

FINEST_DECODER_STRIDE = 4
"""An encoder whose finest map is coarser than this gets upsampling stages down to it (or to the output stride)."""


@dataclass
class DenseInputs:
    """What a dense head reads: the fused vector that conditions it, the image feature maps, the text tokens, and
    the size of the map to predict."""

    condition: torch.Tensor  # [B, dim]
    maps: list[torch.Tensor]  # [B, C_i, H_i, W_i], finest first
    text: EncoderOutput
    size: tuple[int, int]


@dataclass
class DenseMaps:
    """A dense head's output: logits [B, C, H, W] (dense_regression: [B, H, W]) and, in training, those of the
    earlier decoder stages with an output layer, upsampled to the same size (latest stage first)."""

    logits: torch.Tensor
    aux: list[torch.Tensor]


@torch.no_grad()
def probe_maps(encoder: nn.Module, image_size: int) -> list[tuple[int, float]]:
    """(channels, stride) of each feature map `encoder` gives dense heads, finest first, from one forward pass of
    a blank image in eval mode (so the architecture alone decides, whatever the encoder family)."""
    training = encoder.training
    encoder.eval()
    blank = torch.zeros(1, 3, image_size, image_size, device=next(encoder.parameters()).device)
    maps = feature_maps(encoder(blank, maps=True) if getattr(encoder, "returns_maps", False) else encoder(blank))
    encoder.train(training)
    return [(m.shape[1], image_size / m.shape[-2]) for m in maps]


class DecoderStage(nn.Module):
    """3x3 convolution, group norm, FiLM from the fused vector (gamma and beta start at zero), ReLU."""

    def __init__(self, width: int, condition_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm = nn.GroupNorm(math.gcd(8, width), width)
        self.film = nn.Linear(condition_dim, 2 * width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(condition)[:, :, None, None].chunk(2, dim=1)
        return F.relu((1 + gamma) * self.norm(self.conv(x)) + beta)


class TextAttention(nn.Module):
    """Spatial positions attend to the text tokens (pre-norm block, residual branches gated from zero)."""

    def __init__(self, width: int, text_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.text = nn.Linear(text_dim, width)
        self.block = Block(width, heads, dropout, gated=True, cross=True)

    def forward(self, x: torch.Tensor, text: EncoderOutput) -> torch.Tensor:
        batch, width, height, breadth = x.shape
        positions = x.flatten(2).transpose(1, 2)
        everywhere = torch.ones(positions.shape[:2], dtype=torch.bool, device=x.device)
        attended, _ = self.block(positions, everywhere, self.text(text.tokens), text.mask)
        return attended.transpose(1, 2).reshape(batch, width, height, breadth)


class DenseHead(nn.Module):
    """One dense task's decoder and output layers (see the module docstring)."""

    def __init__(
        self,
        spec: TaskSpec,
        map_shapes: list[tuple[int, float]],
        condition_dim: int,
        text_dim: int,
        width: int = 64,
        attend_text: bool = False,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not map_shapes:
            raise ValueError(f"task {spec.name!r}: the image encoder gives no feature map")
        self.laterals = nn.ModuleList(nn.Conv2d(channels, width, 1) for channels, _ in map_shapes)
        finest, target = map_shapes[0][1], max(FINEST_DECODER_STRIDE, spec.output_stride)
        self.upsampling = max(0, math.ceil(math.log2(finest / target) - 1e-6))
        stages = len(map_shapes) + self.upsampling
        self.stages = nn.ModuleList(DecoderStage(width, condition_dim) for _ in range(stages))
        self.attention = TextAttention(width, text_dim, heads, dropout) if attend_text else None
        if any(not -stages <= d < stages for d in spec.depths or []):
            raise ValueError(f"task {spec.name!r}: depths {spec.depths} are outside the decoder's {stages} stages")
        self.depths = sorted({d % stages for d in spec.depths or []} | {stages - 1})  # the last stage always has one
        self.outputs = nn.ModuleDict({str(d): nn.Conv2d(width, spec.out_features, 1) for d in self.depths})
        self.drop = nn.Dropout2d(dropout)
        self.squeeze = spec.type == "dense_regression"

    @classmethod
    def from_config(
        cls, spec: TaskSpec, config: FusionConfig, in_dims: dict[str, int], map_shapes: list[tuple[int, float]]
    ) -> DenseHead:
        attend = config.fusion == "cross_attention"
        return cls(
            spec,
            map_shapes,
            config.dim,
            in_dims["text"],
            config.decoder_dim,
            attend,
            config.fusion_heads,
            config.dropout,
        )

    def forward(self, inputs: DenseInputs) -> DenseMaps:
        maps, condition = inputs.maps, inputs.condition
        x = self.stages[0](self.laterals[-1](maps[-1]), condition)
        if self.attention is not None:
            x = self.attention(x, inputs.text)
        features = [x]
        for lateral, skip in zip(reversed(self.laterals[:-1]), reversed(maps[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + lateral(skip)
            features.append(self.stages[len(features)](x, condition))
            x = features[-1]
        for _ in range(self.upsampling):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            features.append(self.stages[len(features)](x, condition))
            x = features[-1]
        depths = self.depths if self.training else self.depths[-1:]
        logits = [self._logits(str(d), features[d], inputs.size) for d in reversed(depths)]
        return DenseMaps(logits[0], logits[1:])

    def _logits(self, depth: str, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.outputs[depth](self.drop(features))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.squeeze(1) if self.squeeze else logits
