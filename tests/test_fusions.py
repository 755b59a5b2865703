"""Fusions on hand-made encoder outputs: padding invariance and binding a word to one image token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmfusion.config import FusionConfig
from mmfusion.fusions import FUSIONS, build_fusion
from mmfusion.layers import EncoderOutput

IN_DIMS = {"image": 12, "text": 8}


def _outputs(tokens: torch.Tensor, mask: torch.Tensor, text: torch.Tensor) -> dict[str, EncoderOutput]:
    image = EncoderOutput(pooled=tokens[:, 0], tokens=tokens, mask=mask)
    return {"image": image, "text": EncoderOutput(pooled=text, tokens=text.unsqueeze(1), mask=mask[:, :1])}


@pytest.mark.parametrize("fusion", sorted(name for name, cls in FUSIONS.items() if cls.reads_tokens))
def test_token_reading_fusions_ignore_padded_image_tokens(fusion):
    torch.manual_seed(0)
    model = build_fusion(FusionConfig(fusion=fusion, dim=16, fusion_heads=2, dropout=0.0), IN_DIMS).eval()
    tokens, text = torch.randn(2, 3, 12), torch.randn(2, 8)
    padded = torch.cat([tokens, 100 * torch.randn(2, 4, 12)], 1)
    mask = torch.tensor([[True] * 3 + [False] * 4] * 2)
    with torch.no_grad():
        plain = model(_outputs(tokens, torch.ones(2, 3, dtype=torch.bool), text)).features
        with_padding = model(_outputs(padded, mask, text)).features
    torch.testing.assert_close(with_padding, plain)


def _binding_batch(generator: torch.Generator, size: int) -> tuple[dict[str, EncoderOutput], torch.Tensor]:
    """Two image tokens, each a colour (one of 4) and a shape (the two shapes differ); the text names one token's
    colour and the label is that token's shape. The pooled image vector (the mean) says which colours and shapes
    there are, not which goes with which, so only a fusion that reads the named token beats chance (0.5)."""
    colours = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(size)])
    shapes = torch.stack([torch.randperm(2, generator=generator) for _ in range(size)])  # two different shapes
    tokens = torch.cat([nn.functional.one_hot(colours, 4), nn.functional.one_hot(shapes, 2)], -1).float()
    tokens = torch.cat([tokens, torch.zeros(size, 2, 6)], -1)
    asked = torch.randint(0, 2, (size,), generator=generator)
    rows = torch.arange(size)
    text = torch.cat([nn.functional.one_hot(colours[rows, asked], 4).float(), torch.zeros(size, 4)], -1)
    image = EncoderOutput(pooled=tokens.mean(1), tokens=tokens, mask=torch.ones(size, 2, dtype=torch.bool))
    words = EncoderOutput(pooled=text, tokens=text.unsqueeze(1), mask=torch.ones(size, 1, dtype=torch.bool))
    return {"image": image, "text": words}, shapes[rows, asked]


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_token_level_fusions_read_the_image_token_the_text_names(fusion):
    solves = FUSIONS[fusion].reads_tokens
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_fusion(FusionConfig(fusion=fusion, dim=32, fusion_heads=2, dropout=0.0), IN_DIMS)
    head = nn.Linear(32, 2)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(150):
        inputs, labels = _binding_batch(generator, 64)
        loss = nn.functional.cross_entropy(head(model(inputs).features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inputs, labels = _binding_batch(generator, 2000)
    with torch.no_grad():
        accuracy = (head(model(inputs).features).argmax(-1) == labels).float().mean().item()
    assert (accuracy > 0.95) if solves else (accuracy < 0.6), accuracy
