"""Encoders: the EncoderOutput contract, padding invariance, and the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_batch, tiny_config

from mmfusion import FusionConfig, FusionModel
from mmfusion.image_encoders import IMAGE_ENCODERS, ResidualCNN, build_image_encoder, load_backbone_weights
from mmfusion.text_encoders import build_text_encoder


@pytest.mark.parametrize(
    "name,size,tokens,dim",
    [("simple_cnn", 32, 64, 16), ("resnet18", 64, 4, 512), ("efficientnet_b0", 64, 4, 1280), ("vit_b_16", 32, 4, 768)],
)
def test_image_encoder_tokens_and_pooled(name, size, tokens, dim):
    images = torch.randn(2, 3, size, size)
    for pooling, pool in (("mean", lambda t: t.mean(1)), ("max", lambda t: t.amax(1))):
        torch.manual_seed(0)
        encoder = build_image_encoder(tiny_config(image_encoder=name, image_size=size, image_pooling=pooling)).eval()
        out = encoder(images)
        assert encoder.out_dim == dim
        assert out.tokens.shape == (2, tokens, dim) and out.pooled.shape == (2, dim) and out.mask.all()
        if name != "vit_b_16":  # CNN: pooled is the mean or max of the flattened feature map
            torch.testing.assert_close(out.pooled, pool(out.tokens))


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


@pytest.mark.parametrize(
    "name,size,tokens,dim", [("cnn_small", 64, 16, 256), ("cnn_small", 48, 9, 256), ("cnn_base", 32, 4, 384)]
)
def test_residual_cnn_tokens_pooling_and_gradients(name, size, tokens, dim):
    torch.manual_seed(0)
    encoder = IMAGE_ENCODERS[name].from_config(tiny_config(image_encoder=name, image_pooling="max"))
    out = encoder(torch.randn(3, 3, size, size))
    assert encoder.out_dim == dim and out.tokens.shape == (3, tokens, dim) and out.mask.all()
    torch.testing.assert_close(out.pooled, out.tokens.amax(1))
    (out.pooled.sum() + out.tokens.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    assert type(build_image_encoder(tiny_config(image_encoder=name))) is type(encoder)


def test_residual_cnn_sample_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    encoder = build_image_encoder(tiny_config(image_encoder="cnn_small")).train()  # GroupNorm: per sample
    images = torch.randn(4, 3, 64, 64)
    alone = encoder(images[:1]).tokens
    torch.testing.assert_close(encoder(images).tokens[:1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder(torch.cat([images[:1], -images[1:]])).tokens[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,field", [("cnn_small", 93), ("cnn_base", 213), ("simple_cnn", 22)])
def test_receptive_field_of_a_token(name, field):
    """The pixels a central token sees through the convolutions (GroupNorm, which mixes positions, taken out)."""
    torch.manual_seed(0)
    encoder = build_image_encoder(FusionConfig(image_encoder=name))
    for module_name, module in list(encoder.named_modules()):
        if isinstance(module, torch.nn.GroupNorm):
            parent, _, child = module_name.rpartition(".")
            setattr(encoder.get_submodule(parent), child, torch.nn.Identity())
    image = torch.rand(1, 3, 240, 240, requires_grad=True)
    features = encoder.features(image)
    features[0, :, features.shape[2] // 2, features.shape[3] // 2].sum().backward()
    rows = image.grad.abs().sum((0, 1, 3)).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == field


def test_residual_cnn_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = FusionModel(tiny_config(image_encoder="cnn_small", fusion="gated")).eval()
    batch = tiny_batch(image_size=32)
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    loaded = FusionModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt")).eval()
    assert isinstance(loaded.image_encoder, ResidualCNN)
    for name, logits in model(**inputs).logits.items():
        torch.testing.assert_close(loaded(**inputs).logits[name], logits)
