"""Shared building blocks: encoder output type, masked pooling and pre-norm attention blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EncoderOutput:
    """What every encoder returns: one vector per sample and a sequence of token features with its mask.
    Image encoders also give the (height, width) grid their tokens came from (row-major), so a feature map can be
    rebuilt as tokens.transpose(1, 2).view(B, D, *grid)."""

    pooled: torch.Tensor  # [B, D]
    tokens: torch.Tensor  # [B, T, D]
    mask: torch.Tensor  # [B, T] bool, True = real token
    grid: tuple[int, int] | None = None  # image tokens: (H, W) with H * W = T; None for text


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens only, so padding never changes the result."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class Attention(nn.Module):
    """Multi-head attention over `scaled_dot_product_attention`; can also return the attention weights."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] attends to context [B, S, D]; context_mask [B, S] is True for real positions."""
        batch, length, dim = x.shape
        q = self.q(x).view(batch, length, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(batch, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        allowed = context_mask[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            attended = F.dropout(weights, dropout, self.training) @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim)), weights


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x attends to itself, or with `cross=True` to a `context`, then an MLP.

    With `gated=True` both residual branches are scaled by tanh(gate), gates starting at zero, so a block added
    to a trained network starts as the identity.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, gated: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.attention = Attention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim, dropout)
        self.drop = nn.Dropout(dropout)
        self.gates = nn.Parameter(torch.zeros(2)) if gated else None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.norm_x(x)
        if context is None:
            context_normed, context_mask = normed, mask
        else:
            context_normed = self.norm_context(context)
        attended, weights = self.attention(normed, context_normed, context_mask, need_weights)
        attention_gate, mlp_gate = (1.0, 1.0) if self.gates is None else self.gates.tanh().unbind()
        x = x + attention_gate * self.drop(attended)
        x = x + mlp_gate * self.drop(self.mlp(self.norm_mlp(x)))
        return x * mask.unsqueeze(-1).to(x.dtype), weights
