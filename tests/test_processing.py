"""FusionProcessor: image modes, reproducible augmentation, tokenizers, labels, save/load."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.config import TaskSpec
from mmfusion.errors import BadInputError, CheckpointError
from mmfusion.processing import FusionProcessor, ProcessorSettings, hf_tokenizer, open_image, to_rgb, train_tokenizer

TEXTS = ["a large red circle on the left", "two small blue squares", "a green star near the top"]


def _processor(**settings) -> FusionProcessor:
    return FusionProcessor(train_tokenizer(TEXTS), ProcessorSettings(**settings))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16", "I", "CMYK", "RGB", "1"])
def test_every_mode_becomes_rgb(mode):
    source = Image.new("RGB", (8, 8), (255, 0, 0))
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(np.full((8, 8), 255, dtype=np.int32)).convert("I")
    else:
        image = source.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if mode in ("I;16", "I"):
        assert rgb.getpixel((0, 0)) == (255, 255, 255)  # full-scale 16-bit is white, not clipped garbage
    if mode in ("RGBA", "P", "RGB", "CMYK"):
        assert rgb.getpixel((0, 0))[0] > 200 and rgb.getpixel((0, 0))[1] < 50


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_open_image_from_bytes_dict_and_path(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 7), (0, 255, 0)).save(buffer, format="PNG")
    (tmp_path / "x.png").write_bytes(buffer.getvalue())
    for source in (buffer.getvalue(), {"bytes": buffer.getvalue(), "path": None}, str(tmp_path / "x.png")):
        assert open_image(source, 10_000, "here").size == (5, 7)
    with pytest.raises(BadInputError, match="here: image of 5x7 pixels exceeds data.max_image_pixels=10"):
        open_image(buffer.getvalue(), 10, "here")


def test_image_tensor_is_normalised_and_resized():
    processor = _processor(image_size=16)
    tensor = processor.image_tensor(Image.new("RGB", (40, 20), (255, 255, 255)))
    assert tensor.shape == (3, 16, 16)
    expected = (1.0 - torch.tensor(processor.settings.mean)) / torch.tensor(processor.settings.std)
    torch.testing.assert_close(tensor[:, 0, 0], expected)


def test_augmentation_randomness_comes_only_from_seed_epoch_index():
    processor = _processor(image_size=16, crop_scale=(0.3, 0.6))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    same = [processor.image_tensor(image, (0, 1, 5)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], processor.image_tensor(image, (0, 2, 5)))  # other epoch
    assert not torch.equal(same[0], processor.image_tensor(image, (0, 1, 6)))  # other index
    assert not torch.equal(same[0], processor.image_tensor(image, (1, 1, 5)))  # other seed
    torch.manual_seed(123)  # global RNG state is irrelevant
    assert torch.equal(same[0], processor.image_tensor(image, (0, 1, 5)))


@pytest.mark.parametrize("kind", ["wordlevel", "bpe"])
def test_trained_tokenizers(kind):
    tokenizer = train_tokenizer(TEXTS, kind, vocab_size=200)
    assert tokenizer.token_to_id("[PAD]") == 0 and tokenizer.token_to_id("[UNK]") == 1
    processor = FusionProcessor(tokenizer)
    ids = processor.encode_text("A LARGE red circle")
    assert ids == processor.encode_text("a large red circle") and 1 not in ids  # lower-cased, all known
    if kind == "wordlevel":
        assert processor.encode_text("a purple circle")[1] == 1  # unknown word


def test_truncation_is_counted():
    processor = _processor(max_text_length=3)
    assert len(processor.encode_text("a large red circle on the left")) == 3
    assert processor.encode_text("two") and processor.truncated == 1


def test_hf_tokenizer_matches_transformers(minilm_path):
    from transformers import AutoTokenizer

    tokenizer, pad_id = hf_tokenizer(minilm_path)
    processor = FusionProcessor(tokenizer, ProcessorSettings(pad_id=pad_id, max_text_length=8))
    reference = AutoTokenizer.from_pretrained(minilm_path)("a large red circle")["input_ids"]
    assert processor.encode_text("a large red circle") == reference and pad_id == 0
    assert len(processor.encode_text("word " * 50)) == 8  # truncation keeps [CLS] ... [SEP]


def test_label_encoding():
    processor = _processor()
    topic = TaskSpec("topic", labels=["cat", "dog"])
    tags = TaskSpec("tags", "multilabel", labels=["a", "b", "c"])
    score = TaskSpec("score", "regression")
    assert processor.encode_label(topic, "dog", "w")[0].item() == 1
    assert processor.encode_label(topic, None, "w") == (torch.tensor(-1), False)
    assert processor.encode_label(tags, ["c", "a"], "w")[0].tolist() == [1.0, 0.0, 1.0]
    assert processor.encode_label(score, "2.5", "w")[0].item() == 2.5  # CSV text numbers
    with pytest.raises(BadInputError, match="w: regression target for task 'score' is not finite"):
        processor.encode_label(score, float("nan"), "w")
    with pytest.raises(BadInputError, match="w: label 'bird' of task 'topic' was not seen in training"):
        processor.encode_label(topic, "bird", "w")
    flags = TaskSpec("flag", labels=["False", "True"])
    assert processor.encode_label(flags, True, "w")[0].item() == 1


def test_save_and_load_round_trip(tmp_path):
    processor = _processor(image_size=24, max_text_length=5, crop_scale=(0.5, 0.9))
    processor.save_pretrained(tmp_path)
    loaded = FusionProcessor.from_pretrained(tmp_path)
    assert loaded.settings == processor.settings
    image = Image.new("RGB", (30, 30), (10, 200, 30))
    assert torch.equal(loaded.image_tensor(image, (0, 0, 3)), processor.image_tensor(image, (0, 0, 3)))
    assert loaded.encode_text(TEXTS[0]) == processor.encode_text(TEXTS[0])
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer.json is not a valid tokenizer file"):
        FusionProcessor.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="processor file missing: .*processor.json"):
        FusionProcessor.from_pretrained(tmp_path / "empty")
