"""Encoders: the EncoderOutput contract, padding invariance, and the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from mmfusion.image_encoders import build_image_encoder, load_backbone_weights
from mmfusion.text_encoders import build_text_encoder


@pytest.mark.parametrize(
    "name,size,tokens,dim",
    [("simple_cnn", 32, 64, 16), ("resnet18", 64, 4, 512), ("efficientnet_b0", 64, 4, 1280), ("vit_b_16", 32, 4, 768)],
)
def test_image_encoder_tokens_and_pooled(name, size, tokens, dim):
    encoder = build_image_encoder(tiny_config(image_encoder=name, image_size=size)).eval()
    out = encoder(torch.randn(2, 3, size, size))
    assert encoder.out_dim == dim
    assert out.tokens.shape == (2, tokens, dim) and out.pooled.shape == (2, dim) and out.mask.all()
    if name != "vit_b_16":  # CNN: pooled is the mean of the flattened feature map
        torch.testing.assert_close(out.pooled, out.tokens.mean(1))


def test_backbone_weights_load_from_a_local_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    reference = torchvision.models.resnet18(weights=None)
    save_file(reference.state_dict(), tmp_path / "r18.safetensors")
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    for file in ("r18.safetensors", "r18.pth"):
        encoder = build_image_encoder(tiny_config("resnet18", image_weights=str(tmp_path / file)))
        assert torch.equal(encoder.features[0].weight, reference.conv1.weight)
    with pytest.raises(ValueError, match="do not fit ResNet: missing"):
        load_backbone_weights(torchvision.models.resnet34(weights=None), str(tmp_path / "r18.safetensors"))
    with pytest.raises(FileNotFoundError, match="image_weights: no such file"):
        build_image_encoder(tiny_config("resnet18", image_weights=str(tmp_path / "nope.pth")))


@pytest.mark.parametrize("name", ["lstm", "gru", "transformer"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_text_encoder_ignores_padding(name, bidirectional):
    torch.manual_seed(0)
    encoder = build_text_encoder(tiny_config(text_encoder=name, bidirectional=bidirectional)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 0, 0, 0, 0], [9, 10, 11, 12, 13, 14, 15, 16]])
    mask = (ids > 0).long()
    short = encoder(ids, mask)
    long = encoder(torch.nn.functional.pad(ids, (0, 24)), torch.nn.functional.pad(mask, (0, 24)))
    torch.testing.assert_close(short.pooled, long.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short.tokens, long.tokens[:, :8], atol=1e-5, rtol=1e-5)
    assert short.mask.tolist() == (ids > 0).tolist()
    # changing a padded id changes nothing; changing a real one does
    changed = ids.clone()
    changed[0, 6] = 3
    torch.testing.assert_close(encoder(changed, mask).pooled, short.pooled)
    changed[0, 1] = 3
    assert not torch.allclose(encoder(changed, mask).pooled[0], short.pooled[0])


def test_transformer_rejects_texts_longer_than_its_positions():
    encoder = build_text_encoder(tiny_config(text_encoder="transformer", max_text_length=8))
    with pytest.raises(ValueError, match="text of 9 tokens is longer than max_text_length=8"):
        encoder(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 9))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_encoder_reproduces_sentence_transformers(minilm_path, pooling):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    sentences = ["a large red circle on the left", "two blue squares"]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    encoder = build_text_encoder(tiny_config(text_encoder="hf", text_model=minilm_path, text_pooling=pooling)).eval()
    with torch.no_grad():
        out = encoder(batch["input_ids"], batch["attention_mask"])
        padded = {k: torch.nn.functional.pad(v, (0, 5)) for k, v in batch.items() if k != "token_type_ids"}
        out_padded = encoder(padded["input_ids"], padded["attention_mask"])
    assert encoder.out_dim == 384 and out.tokens.shape[-1] == 384
    torch.testing.assert_close(out.pooled, out_padded.pooled, atol=1e-5, rtol=1e-4)
    if pooling == "cls":
        torch.testing.assert_close(out.pooled, out.tokens[:, 0])
    else:  # all-MiniLM-L6-v2 is mean pooling + L2 normalisation
        reference = SentenceTransformer(minilm_path, device="cpu").encode(sentences, convert_to_tensor=True)
        torch.testing.assert_close(torch.nn.functional.normalize(out.pooled, dim=-1), reference, atol=1e-5, rtol=1e-4)
