"""Text encoders: LSTM/GRU, a from-scratch transformer and any Hugging Face encoder, all returning `EncoderOutput`.

Inputs are right-padded `input_ids` [B, T] with `attention_mask` [B, T] (1 = real token). Padding never
changes a sample's output: RNNs read packed sequences, attention masks padded keys, pooling ignores padding.
Every class is built by `from_config(config, weights)` (see image_encoders.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .adapters import add_lora, enable_gradient_checkpointing
from .config import FusionConfig
from .layers import Block, EncoderOutput, masked_mean
from .pretrained import copy_weights, hf_model, load_hf_tower, resolve_pretrained


def _pool(tokens: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    return tokens[:, 0] if pooling == "cls" else masked_mean(tokens, mask)


class RNNEncoder(nn.Module):
    """Embedding + LSTM or GRU over packed sequences; pooled = last hidden state of each direction."""

    def __init__(self, cell: str, vocab_size: int, dim: int, layers: int, bidirectional: bool, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        rnn_class = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_class(
            dim, dim, layers, batch_first=True, bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0
        )
        self.out_dim = dim * (2 if bidirectional else 1)

    @classmethod
    def from_config(cls, config: FusionConfig, weights: bool = True) -> RNNEncoder:
        sizes = config.vocab_size, config.text_dim, config.text_layers
        return cls(config.text_encoder, *sizes, config.bidirectional, config.dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        mask = attention_mask.bool()
        lengths = mask.sum(1).clamp(min=1).cpu()
        embedded = self.embedding(input_ids)
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        # oneDNN's bf16 LSTM fails on CPU for some batches (all lengths equal): CPU RNNs run in float32.
        with torch.autocast("cpu", enabled=False):
            outputs, hidden = self.rnn(packed)
        tokens, _ = pad_packed_sequence(outputs, batch_first=True, total_length=input_ids.shape[1])
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # LSTM returns (h, c)
        directions = 2 if self.rnn.bidirectional else 1
        pooled = torch.cat(list(hidden[-directions:]), dim=-1)
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)


class TransformerTextEncoder(nn.Module):
    """From-scratch pre-norm transformer with learned positions and a key padding mask."""

    def __init__(self, vocab_size: int, dim: int, layers: int, heads: int, max_length: int, dropout: float, pooling):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.positions = nn.Embedding(max_length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.pooling = pooling
        self.out_dim = dim

    @classmethod
    def from_config(cls, config: FusionConfig, weights: bool = True) -> TransformerTextEncoder:
        sizes = config.vocab_size, config.text_dim, config.text_layers, config.text_heads, config.max_text_length
        return cls(*sizes, config.dropout, config.text_pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        length = input_ids.shape[1]
        if length > self.positions.num_embeddings:
            raise ValueError(f"text of {length} tokens is longer than max_text_length={self.positions.num_embeddings}")
        mask = attention_mask.bool()
        x = self.embedding(input_ids) + self.positions(torch.arange(length, device=input_ids.device))
        for block in self.blocks:
            x, _ = block(x, mask)
        tokens = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)
        return EncoderOutput(pooled=_pool(tokens, mask, self.pooling), tokens=tokens, mask=mask)


class HFTextEncoder(nn.Module):
    """Any `transformers` AutoModel encoder, or the text tower of a dual model (CLIP, SigLIP); pooled by the first
    (CLS) token, the masked mean, or the model's own pooled output (`pooler`)."""

    def __init__(self, model_config: dict, pooling: str = "mean") -> None:
        super().__init__()
        self.model = hf_model(model_config, "text")
        if pooling != "pooler" and getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT-style pooler: unused, and unused parameters upset DDP
        self.pooling = pooling
        self.out_dim = self._pooled_width()

    def _pooled_width(self) -> int:
        config = self.model.config
        if self.pooling == "pooler":  # SigLIP's head projects to projection_size
            return getattr(config, "projection_size", None) or config.hidden_size
        return config.hidden_size

    @classmethod
    def from_config(cls, config: FusionConfig, weights: bool = True) -> HFTextEncoder:
        config = resolve_pretrained(config)
        encoder = cls(config.text_model_config, config.text_pooling)
        if weights:
            copy_weights(encoder.model, load_hf_tower(config.text_model, "text"), f"text_model {config.text_model}")
        if config.text_lora_rank:
            add_lora(encoder.model, config.text_lora_rank, config.text_lora_targets)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(encoder.model)
        return encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        output = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tokens, mask = output.last_hidden_state, attention_mask.bool()
        if self.pooling == "pooler":
            if output.pooler_output is None:
                raise ValueError(f"text_pooling pooler: {type(self.model).__name__} has no pooled output")
            return EncoderOutput(pooled=output.pooler_output, tokens=tokens, mask=mask)
        return EncoderOutput(pooled=_pool(tokens, mask, self.pooling), tokens=tokens, mask=mask)


TEXT_ENCODERS = {"lstm": RNNEncoder, "gru": RNNEncoder, "transformer": TransformerTextEncoder, "hf": HFTextEncoder}


def build_text_encoder(config: FusionConfig, weights: bool = True) -> nn.Module:
    """The configured text encoder; `weights=False`: its architecture only (no pretrained weights read)."""
    if config.text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"unknown text_encoder {config.text_encoder!r}; choose from {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[config.text_encoder].from_config(config, weights)
