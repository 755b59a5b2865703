"""Tiny pretrained sources, built with random weights and saved the way their libraries publish them: timm models
(`timm.models.save_for_hf`: config.json + model.safetensors), transformers vision models, BERT, CLIP and SigLIP with
a small word-level tokenizer and their image processors. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "a photo of cat cats dog red blue green bird on the mat sky in park two and picture number".split()
SIZE = 32  # image side of every source
LAYERS = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_tokenizer(directory: Path) -> int:
    """A lower-casing word-level tokenizer with <s> ... </s> around each text ([PAD] 0, [UNK] 1, <s> 2, </s> 3),
    saved as a transformers fast tokenizer; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "<s>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(directory)
    return len(vocab)


def text_config(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **LAYERS,
    )


def tiny_dual(directory: Path, kind: str):
    """A CLIP ("clip") or SigLIP ("siglip") model with its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    text = text_config(tiny_tokenizer(directory))
    vision = dict(hidden_size=32, image_size=SIZE, patch_size=8, **LAYERS)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():
            model.logit_bias.fill_(-1.5)
        processor = SiglipImageProcessor(size={"height": SIZE, "width": SIZE})
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model.eval()


def tiny_bert(directory: Path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**text_config(tiny_tokenizer(directory))))
    model.save_pretrained(directory)
    return model.eval()


def tiny_hf_vision(directory: Path, kind: str):
    """A transformers vision model (vit, dinov2, convnext, swin) with a ViT image processor at 32 px."""
    from transformers import (
        ConvNextConfig,
        ConvNextModel,
        Dinov2Config,
        Dinov2Model,
        SwinConfig,
        SwinModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(0)
    common = dict(hidden_size=32, image_size=SIZE, patch_size=8, num_hidden_layers=2, num_attention_heads=2)
    model = {
        "vit": lambda: ViTModel(ViTConfig(intermediate_size=64, **common)),
        "dinov2": lambda: Dinov2Model(Dinov2Config(mlp_ratio=2, **common)),
        "convnext": lambda: ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
        "swin": lambda: SwinModel(
            SwinConfig(image_size=SIZE, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
        ),
    }[kind]()
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}, resample=3).save_pretrained(directory)
    return model.eval()


def tiny_timm(directory: Path, name: str = "test_vit", **model_args):
    """timm's own test architectures (a few hundred thousand parameters), saved as a timm Hub repository is;
    returns the source model (with its 10-class classifier)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **model_args)
    timm.models.save_for_hf(model, directory, model_args=model_args, safe_serialization=True)
    return model.eval()
