"""Text encoders: LSTM/GRU, a from-scratch transformer and any Hugging Face encoder, all returning `EncoderOutput`.

Inputs are right-padded `input_ids` [B, T] with `attention_mask` [B, T] (1 = real token). Padding never
changes a sample's output: RNNs read packed sequences, attention masks padded keys, pooling ignores padding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import FusionConfig
from .layers import Block, EncoderOutput, masked_mean


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
    """Any `transformers` AutoModel encoder; pooled by the first (CLS) token or the masked mean."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if config.text_model_config is not None:  # rebuilding a saved checkpoint: architecture only
            values = dict(config.text_model_config)
            model_config = AutoConfig.for_model(values.pop("model_type"), **values)
            self.model = AutoModel.from_config(model_config)
        elif config.text_model:
            self.model = AutoModel.from_pretrained(config.text_model)
            config.text_model_config = self.model.config.to_dict()
        else:
            raise ValueError("text_encoder 'hf' needs text_model (a local path or Hub id)")
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT-style pooler: unused, and unused parameters upset DDP
        self.pooling = config.text_pooling
        self.out_dim = self.model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        return EncoderOutput(pooled=_pool(tokens, mask, self.pooling), tokens=tokens, mask=mask)


TEXT_ENCODERS = {"lstm": RNNEncoder, "gru": RNNEncoder, "transformer": TransformerTextEncoder, "hf": HFTextEncoder}


def build_text_encoder(config: FusionConfig) -> nn.Module:
    """Build the configured text encoder; for `hf` this records the transformers config in `config`."""
    name = config.text_encoder
    if name in ("lstm", "gru"):
        return RNNEncoder(
            name, config.vocab_size, config.text_dim, config.text_layers, config.bidirectional, config.dropout
        )
    if name == "transformer":
        return TransformerTextEncoder(
            config.vocab_size,
            config.text_dim,
            config.text_layers,
            config.text_heads,
            config.max_text_length,
            config.dropout,
            config.text_pooling,
        )
    if name == "hf":
        return HFTextEncoder(config)
    raise ValueError(f"unknown text_encoder {name!r}; choose from {sorted(TEXT_ENCODERS)}")
