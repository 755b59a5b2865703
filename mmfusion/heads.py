"""Task heads: a small optional tower on the shared [B, dim] features, then the task's output layer.

Matching heads are different: they project each modality's pooled vector into a shared space and return
the [B, B] image-to-text similarity logits (CLIP-style, learnable temperature). Dense heads (segmentation,
dense_regression) decode the image encoder's feature maps conditioned on the fused vector (dense.py).

Every head is built by `from_config(spec, config, in_dims, map_shapes)`: `in_dims` are the encoders' widths,
`map_shapes` the (channels, stride) of the image feature maps (`dense.probe_maps`; None when no task is dense).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import FusionConfig, TaskSpec
from .dense import DenseHead


class TaskHead(nn.Module):
    """`hidden_layers` task-specific layers, then a linear output: logits [B, C] (regression: [B])."""

    def __init__(self, spec: TaskSpec, dim: int, dropout: float) -> None:
        super().__init__()
        tower = []
        for _ in range(spec.hidden_layers):
            tower += [nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout)]
        self.tower = nn.Sequential(*tower)
        self.drop = nn.Dropout(dropout)
        self.output = nn.Linear(dim, spec.out_features)
        self.squeeze = spec.type == "regression"

    @classmethod
    def from_config(cls, spec: TaskSpec, config: FusionConfig, in_dims: dict[str, int], map_shapes=None) -> TaskHead:
        return cls(spec, config.dim, config.regression_dropout if spec.type == "regression" else config.dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.drop(self.tower(features)))
        return logits.squeeze(-1) if self.squeeze else logits


def vector_temperatures(state: dict, prefix: str = "") -> dict:
    """Checkpoints written before mmfusion ran under FSDP hold matching heads' temperature and bias as 0-d tensors:
    reshape them (in place) to today's [1]."""
    for key in [k for k in state if k.startswith(prefix) and k.endswith((".logit_scale", ".logit_bias"))]:
        if state[key].dim() == 0:
            state[key] = state[key].reshape(1)
    return state


class MatchingHead(nn.Module):
    """Image-text contrastive head: cosine similarities scaled by a learned temperature.

    `dual=True` is the head of a pretrained dual encoder (CLIP, SigLIP), started from its projections and
    temperature (`pretrained.init_matching_head`): it also has SigLIP's logit bias (0 for CLIP) and keeps the
    source's temperature as it is (no clamp), so its logits are the source model's."""

    def __init__(self, image_dim: int, text_dim: int, dim: int, dual: bool = False) -> None:
        super().__init__()
        self.image = nn.Linear(image_dim, dim)
        self.text = nn.Linear(text_dim, dim)
        # shape [1], not 0-d: FSDP shards no 0-d parameters
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.zeros(1)) if dual else None
        self.negatives = "pairs"  # the batch's rows its training loss ranks against (train.matching_negatives)
        self.memory_size = 0  # true pairs kept from earlier training batches as extra candidates (the trainer sets it)
        self.memory: torch.Tensor | None = None  # [M, 2 * dim]: their image then text embeddings, without gradient

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        vector_temperatures(state_dict, prefix)  # also for training states that accelerate loads
        super()._load_from_state_dict(state_dict, prefix, *args)

    @classmethod
    def from_config(
        cls, spec: TaskSpec, config: FusionConfig, in_dims: dict[str, int], map_shapes=None
    ) -> MatchingHead:
        """A dual encoder's matching head has the source model's matching width; others the fusion's."""
        from .pretrained import dual_source, matching_dim

        if dual_source(config):
            return cls(in_dims["image"], in_dims["text"], matching_dim(config, in_dims), dual=True)
        return cls(in_dims["image"], in_dims["text"], config.dim)

    def embed(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(image), dim=-1), F.normalize(self.text(text), dim=-1)

    def similarity(self, image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """[B, B] logits: row i scores image i against every text."""
        if self.logit_bias is not None:
            return self.logit_scale.exp() * image_embedding @ text_embedding.T + self.logit_bias
        return self.logit_scale.clamp(max=math.log(100)).exp() * image_embedding @ text_embedding.T

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.similarity(*self.embed(image, text))

    def memory_logits(
        self, image_embedding: torch.Tensor, text_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[B, M] logits of each image against the remembered texts and of each text against the remembered images
        (None while nothing is remembered)."""
        if self.memory is None:
            return None
        image_memory, text_memory = self.memory.chunk(2, dim=-1)
        return self.similarity(image_embedding, text_memory), self.similarity(image_memory, text_embedding).T

    def remember(self, image_embedding: torch.Tensor, text_embedding: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep the newest `memory_size` true pairs (mask: which rows are), newest first, without gradient."""
        if not self.memory_size:
            return
        pairs = torch.cat([image_embedding, text_embedding], dim=-1)[mask].detach()
        kept = pairs if self.memory is None else torch.cat([pairs, self.memory])
        self.memory = kept[: self.memory_size]


HEADS = {
    "classification": TaskHead,
    "multilabel": TaskHead,
    "regression": TaskHead,
    "matching": MatchingHead,
    "segmentation": DenseHead,
    "dense_regression": DenseHead,
}


def build_head(
    spec: TaskSpec, config: FusionConfig, in_dims: dict[str, int], map_shapes: list[tuple[int, float]] | None = None
) -> nn.Module:
    if spec.type not in HEADS:
        raise ValueError(f"task {spec.name!r}: unknown type {spec.type!r}; choose from {sorted(HEADS)}")
    return HEADS[spec.type].from_config(spec, config, in_dims, map_shapes)
