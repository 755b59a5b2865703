"""Fusion layers: combine the image and text `EncoderOutput`s into one [B, dim] representation.

Every fusion returns `FusedOutput` with the output of each of its `layers` (heads may attach at any depth) and
interpretable `extras` (gate values, attention weights). All take `in_dims={"image": D_i, "text": D_t}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import FusionConfig
from .layers import Block, EncoderOutput, masked_mean


@dataclass
class FusedOutput:
    features: torch.Tensor  # [B, dim], the deepest layer
    layers: list[torch.Tensor | None]  # [B, dim] per fusion layer, shallowest first; layers[-1] is features.
    # None at a depth no head reads, where a fusion with per-layer read-outs does not compute one.
    extras: dict[str, torch.Tensor | list[torch.Tensor]] = field(default_factory=dict)
    branches: dict[str, list[torch.Tensor]] | None = None  # late fusion: each modality's own layers


class ResidualTrunk(nn.Module):
    """`depth` residual MLP layers on [B, dim]; returns every layer's output."""

    def __init__(self, dim: int, depth: int, dropout: float) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"fusion_layers must be >= 1, got {depth}")
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout)) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for layer in self.layers:
            x = x + layer(x)
            outputs.append(x)
        return outputs


def read_outs(depths: list[int] | None, depth: int, in_features: int, dim: int) -> nn.ModuleDict:
    """Per-layer [B, dim] projections at the `depths` heads read (default: the last layer), keyed by depth."""
    return nn.ModuleDict({str(d): nn.Linear(in_features, dim) for d in (depths or [depth - 1])})


class Fusion(nn.Module):
    """Base of the fusions: one constructor signature, so building any of them is a registry lookup. `reads_tokens`
    says whether a fusion reads token features or only the pooled vectors (all a feature cache then holds)."""

    reads_tokens = False

    @classmethod
    def from_config(cls, config: FusionConfig, in_dims: dict[str, int]) -> Fusion:
        return cls(in_dims, config.dim, depth=config.fusion_layers, dropout=config.dropout, **cls.options(config))

    @classmethod
    def options(cls, config: FusionConfig) -> dict:
        """The fusion's own constructor arguments, from the config."""
        return {}


class ConcatFusion(Fusion):
    """Concatenate the pooled vectors, project, then a residual MLP trunk."""

    def __init__(self, in_dims: dict[str, int], dim: int, depth: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.project = nn.Linear(sum(in_dims.values()), dim)
        self.trunk = ResidualTrunk(dim, depth, dropout)

    def forward(self, features: dict[str, EncoderOutput], output_attentions: bool = False) -> FusedOutput:
        layers = self.trunk(self.project(torch.cat([features["image"].pooled, features["text"].pooled], -1)))
        return FusedOutput(features=layers[-1], layers=layers)


class GatedFusion(Fusion):
    """Gated multimodal unit (Arevalo et al. 2017): a sigmoid gate mixes the two projected modalities per dimension."""

    def __init__(self, in_dims: dict[str, int], dim: int, depth: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.image = nn.Linear(in_dims["image"], dim)
        self.text = nn.Linear(in_dims["text"], dim)
        self.gate = nn.Linear(in_dims["image"] + in_dims["text"], dim)
        self.trunk = ResidualTrunk(dim, depth, dropout)

    def forward(self, features: dict[str, EncoderOutput], output_attentions: bool = False) -> FusedOutput:
        image, text = features["image"].pooled, features["text"].pooled
        gate = torch.sigmoid(self.gate(torch.cat([image, text], -1)))
        mixed = gate * torch.tanh(self.image(image)) + (1 - gate) * torch.tanh(self.text(text))
        layers = self.trunk(mixed)
        return FusedOutput(features=layers[-1], layers=layers, extras={"gate": gate})


class BilinearFusion(Fusion):
    """Low-rank bilinear pooling (factorised, Yu et al. 2017): sum over `rank` factors of elementwise products."""

    @classmethod
    def options(cls, config: FusionConfig) -> dict:
        return {"rank": config.rank}

    def __init__(self, in_dims: dict[str, int], dim: int, depth: int = 2, dropout: float = 0.1, rank: int = 16):
        super().__init__()
        self.rank = rank
        self.image = nn.Linear(in_dims["image"], dim * rank)
        self.text = nn.Linear(in_dims["text"], dim * rank)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.trunk = ResidualTrunk(dim, depth, dropout)

    def forward(self, features: dict[str, EncoderOutput], output_attentions: bool = False) -> FusedOutput:
        product = self.drop(self.image(features["image"].pooled) * self.text(features["text"].pooled))
        pooled = product.view(product.shape[0], -1, self.rank).sum(-1)
        pooled = torch.sign(pooled) * torch.sqrt(pooled.abs() + 1e-8)  # power normalisation
        layers = self.trunk(self.norm(pooled))
        return FusedOutput(features=layers[-1], layers=layers)


class FiLMFusion(Fusion):
    """Text-conditioned feature-wise modulation (Perez et al. 2018) of the image tokens, layer by layer.

    Each layer: x = x + GELU((1 + gamma(t)) * Linear(LN(x)) + beta(t)); gamma and beta start at zero.
    A layer's [B, dim] read-out (pooled image tokens with the text) exists only at the depths a head reads
    (`readouts`, default: the last), so every parameter takes part in the loss.
    """

    def __init__(
        self, in_dims: dict[str, int], dim: int, depth: int = 2, dropout: float = 0.1, readouts: list[int] | None = None
    ) -> None:
        super().__init__()
        self.image = nn.Linear(in_dims["image"], dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.linears = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.films = nn.ModuleList(nn.Linear(in_dims["text"], 2 * dim) for _ in range(depth))
        self.out = read_outs(readouts, depth, dim + in_dims["text"], dim)
        self.drop = nn.Dropout(dropout)
        for film in self.films:
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)

    def forward(self, features: dict[str, EncoderOutput], output_attentions: bool = False) -> FusedOutput:
        image, text = features["image"], features["text"].pooled
        x, layers, gammas = self.image(image.tokens), [], []
        for depth, (norm, linear, film) in enumerate(zip(self.norms, self.linears, self.films)):
            gamma, beta = film(text).unsqueeze(1).chunk(2, dim=-1)
            x = x + self.drop(nn.functional.gelu((1 + gamma) * linear(norm(x)) + beta))
            read = str(depth) in self.out
            layers.append(self.out[str(depth)](torch.cat([masked_mean(x, image.mask), text], -1)) if read else None)
            gammas.append(gamma.squeeze(1))
        return FusedOutput(features=layers[-1], layers=layers, extras={"film_gamma": gammas})

    reads_tokens = True

    @classmethod
    def options(cls, config: FusionConfig) -> dict:
        return {"readouts": config.readout_depths()}


class CrossAttentionFusion(Fusion):
    """Stacked co-attention: text tokens attend to image tokens and image tokens to text, with masks.

    Residual branches are gated by tanh(g), g starting at zero, so an untrained block passes tokens through.
    A layer's read-out projects the masked means of both token sequences to [B, dim]; it exists only at the
    depths a head reads (`readouts`, default: the last), so every parameter takes part in the loss.
    """

    def __init__(
        self,
        in_dims: dict[str, int],
        dim: int,
        depth: int = 2,
        dropout: float = 0.1,
        heads: int = 4,
        readouts: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.image = nn.Linear(in_dims["image"], dim)
        self.text = nn.Linear(in_dims["text"], dim)
        self.text_blocks = nn.ModuleList(Block(dim, heads, dropout, gated=True, cross=True) for _ in range(depth))
        self.image_blocks = nn.ModuleList(Block(dim, heads, dropout, gated=True, cross=True) for _ in range(depth))
        self.out = read_outs(readouts, depth, 2 * dim, dim)

    def forward(self, features: dict[str, EncoderOutput], output_attentions: bool = False) -> FusedOutput:
        image, text = features["image"], features["text"]
        image_x, text_x = self.image(image.tokens), self.text(text.tokens)
        layers, text_to_image = [], []
        for depth, (text_block, image_block) in enumerate(zip(self.text_blocks, self.image_blocks)):
            new_text, weights = text_block(text_x, text.mask, image_x, image.mask, need_weights=output_attentions)
            image_x, _ = image_block(image_x, image.mask, text_x, text.mask)
            text_x = new_text
            if str(depth) in self.out:
                pooled = torch.cat([masked_mean(text_x, text.mask), masked_mean(image_x, image.mask)], -1)
                layers.append(self.out[str(depth)](pooled))
            else:
                layers.append(None)
            if weights is not None:
                text_to_image.append(weights)
        extras = {"text_to_image_attention": text_to_image} if output_attentions else {}
        return FusedOutput(features=layers[-1], layers=layers, extras=extras)

    reads_tokens = True

    @classmethod
    def options(cls, config: FusionConfig) -> dict:
        return {"heads": config.fusion_heads, "readouts": config.readout_depths()}


class LateFusion(Fusion):
    """No interaction: each modality gets its own trunk, heads run on each and their logits are averaged."""

    def __init__(self, in_dims: dict[str, int], dim: int, depth: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.project = nn.ModuleDict({name: nn.Linear(d, dim) for name, d in in_dims.items()})
        self.trunks = nn.ModuleDict({name: ResidualTrunk(dim, depth, dropout) for name in in_dims})

    def forward(self, features: dict[str, EncoderOutput], output_attentions: bool = False) -> FusedOutput:
        branches = {name: self.trunks[name](self.project[name](features[name].pooled)) for name in self.trunks}
        layers = [torch.stack(depth_outputs).mean(0) for depth_outputs in zip(*branches.values())]
        return FusedOutput(features=layers[-1], layers=layers, branches=branches)


FUSIONS = {
    "concat": ConcatFusion,
    "gated": GatedFusion,
    "cross_attention": CrossAttentionFusion,
    "film": FiLMFusion,
    "bilinear": BilinearFusion,
    "late": LateFusion,
}


def build_fusion(config: FusionConfig, in_dims: dict[str, int]) -> Fusion:
    if config.fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {config.fusion!r}; choose from {sorted(FUSIONS)}")
    return FUSIONS[config.fusion].from_config(config, in_dims)
