"""Predictor and Hub resolution: predictions equal a manual forward pass, in each task's own terms.

`make_checkpoint`, `write_image`, `fake_hub_cache` and `go_offline` are shared with test_cli.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from PIL import Image

from mmfusion import FusionConfig, FusionModel, TaskSpec
from mmfusion.errors import BadInputError, CheckpointError
from mmfusion.hub import resolve_checkpoint
from mmfusion.predictor import Predictor
from mmfusion.processing import FusionProcessor, ProcessorSettings, train_tokenizer
from mmfusion.rows import Collator, model_inputs

TOPICS = ["bird", "cat", "dog"]
TAGS = ["blue", "green", "red"]
CAPTIONS = ["a red cat on a mat", "a blue bird in the sky", "a green dog in the park", "two cats and a dog"]


def tiny_tasks() -> list[TaskSpec]:
    return [
        TaskSpec(name="topic", type="classification", labels=TOPICS, depths=[0, 1]),
        TaskSpec(name="tags", type="multilabel", labels=TAGS),
        TaskSpec(name="score", type="regression", target_mean=2.0, target_std=3.0),
        TaskSpec(name="pair", type="matching"),
    ]


def make_checkpoint(directory: Path) -> Path:
    """A tiny random FusionModel and its processor saved together, as train.py saves best/ and final/."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(CAPTIONS, "wordlevel", vocab_size=50)
    processor = FusionProcessor(tokenizer, ProcessorSettings(image_size=16, max_text_length=12))
    config = FusionConfig(
        image_widths=[4, 8],
        image_size=16,
        text_dim=8,
        vocab_size=processor.vocab_size,
        dim=16,
        dropout=0.0,
        tasks=tiny_tasks(),
    )
    model = FusionModel(config)
    with torch.no_grad():  # make the regression output and the classes clearly distinct from their defaults
        model.heads["score"].output.bias.fill_(0.5)
        model.heads["topic"].output.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def write_image(path: Path, seed: int) -> Path:
    """A small random RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run") / "best")


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_pretrained(str(checkpoint), device="cpu", batch_size=2)


@pytest.fixture
def images(tmp_path) -> list[Path]:
    return [write_image(tmp_path / f"{i}.png", i) for i in range(3)]


def manual_forward(predictor: Predictor, images: list[Path], texts: list[str]):
    """The model's outputs for fully present inputs, built by hand from the processor."""
    processor = predictor.processor
    rows = []
    for i, (image, text) in enumerate(zip(images, texts)):
        pixels = processor.image_tensor(Image.open(image).convert("RGB"))
        rows.append(
            {
                "row": i,
                "pixel_values": pixels,
                "input_ids": processor.encode_text(text),
                "image_present": True,
                "text_present": True,
                "labels": {},
                "label_mask": {},
            }
        )
    with torch.no_grad():
        return predictor.model(**model_inputs(Collator(processor.settings.pad_id)(rows)))


def test_predictions_equal_a_manual_forward_pass(predictor, images):
    texts = CAPTIONS[:3]
    predictions = predictor.predict(images, texts)  # batch_size 2: two batches
    output = manual_forward(predictor, images, texts)
    assert len(predictions) == 3
    topic = output.logits["topic"].softmax(-1)
    tags = output.logits["tags"].sigmoid()
    image_emb, text_emb = output.extras["matching_embeddings"]["pair"].chunk(2, dim=-1)
    for i, prediction in enumerate(predictions):
        assert set(prediction) == {"topic", "tags", "score", "pair"}
        scores = prediction["topic"]["scores"]
        assert list(scores) == TOPICS
        assert scores == pytest.approx(dict(zip(TOPICS, topic[i].tolist())), abs=1e-5)
        assert math.isclose(sum(scores.values()), 1.0, abs_tol=1e-5)
        assert prediction["topic"]["label"] == TOPICS[int(topic[i].argmax())]
        assert prediction["tags"]["scores"] == pytest.approx(dict(zip(TAGS, tags[i].tolist())), abs=1e-5)
        assert prediction["tags"]["labels"] == [t for t, p in zip(TAGS, tags[i].tolist()) if p >= 0.5]
        standardised = float(output.logits["score"].reshape(-1)[i])
        assert prediction["score"]["value"] == pytest.approx(standardised * 3.0 + 2.0, abs=1e-4)
        cosine = float((image_emb[i] * text_emb[i]).sum())
        assert prediction["pair"]["score"] == pytest.approx(cosine, abs=1e-5)
        assert -1.0 <= prediction["pair"]["score"] <= 1.0


def test_pil_images_and_paths_give_the_same_prediction(predictor, images):
    from_path = predictor.predict([images[0]], ["a red cat"])
    from_pil = predictor.predict([Image.open(images[0])], ["a red cat"])
    assert from_pil == from_path


def test_relative_paths_start_from_image_root(predictor, images):
    relative = predictor.predict([images[1].name], ["a dog"], image_root=images[1].parent)
    assert relative == predictor.predict([images[1]], ["a dog"])


def test_missing_image_or_text_uses_the_placeholder(predictor, images):
    full, no_image, no_text = predictor.predict([images[0], None, images[0]], ["a red cat", "a red cat", None])
    for partial in (no_image, no_text):
        assert partial["topic"]["scores"] != pytest.approx(full["topic"]["scores"], abs=1e-6)
        assert partial["score"]["value"] != pytest.approx(full["score"]["value"], abs=1e-6)
        assert math.isclose(sum(partial["topic"]["scores"].values()), 1.0, abs_tol=1e-5)
        assert partial["pair"]["score"] is None  # nothing to match against a placeholder
    assert isinstance(full["pair"]["score"], float)


def test_missing_image_equals_a_forward_with_image_present_false(predictor):
    prediction = predictor.predict([None], ["a blue bird"])[0]
    processor = predictor.processor
    ids = torch.tensor([processor.encode_text("a blue bird")])
    with torch.no_grad():
        output = predictor.model(
            pixel_values=torch.randn(1, 3, 16, 16),  # ignored: the placeholder replaces the image
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            image_present=torch.tensor([False]),
            text_present=torch.tensor([True]),
        )
    assert prediction["score"]["value"] == pytest.approx(float(output.logits["score"]) * 3.0 + 2.0, abs=1e-4)


def test_both_missing_is_an_error(predictor):
    with pytest.raises(BadInputError, match="both the image and the text are missing"):
        predictor.predict([None], [None])


def test_nonexistent_image_is_an_error_naming_it(predictor, tmp_path):
    missing = tmp_path / "no_such_photo.jpg"
    with pytest.raises(BadInputError, match="no_such_photo.jpg") as error:
        predictor.predict([missing], ["a cat"])
    assert "not found" in str(error.value)


@pytest.mark.parametrize("image, message", [("", "empty image path"), (42, "expected an image path, bytes or")])
def test_bad_image_values_are_errors(predictor, image, message):
    with pytest.raises(BadInputError, match=message):
        predictor.predict([image], ["a cat"])


def test_mismatched_lengths_are_an_error(predictor, images):
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        predictor.predict(images[:2], ["a cat"])


# ----- hub -----


def fake_hub_cache(hub_cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """The Hub cache layout: models--owner--name/refs/main names a commit whose snapshot holds the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in checkpoint.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def go_offline(monkeypatch, hf_home: Path) -> Path:
    """HF_HOME=hf_home and HF_HUB_OFFLINE=1; huggingface_hub reads both at import, so its constants are patched too.
    Returns the Hub cache directory."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    return go_offline(monkeypatch, tmp_path / "hf")


def test_local_directory_is_returned_as_is(checkpoint):
    assert resolve_checkpoint(str(checkpoint)) == checkpoint


def test_hub_id_resolves_to_the_cached_snapshot_offline(offline_hub, checkpoint, images):
    snapshot = fake_hub_cache(offline_hub, "someone/tiny-fusion", checkpoint)
    assert resolve_checkpoint("someone/tiny-fusion") == snapshot
    from_hub = Predictor.from_pretrained("someone/tiny-fusion", device="cpu")
    local = Predictor.from_pretrained(str(checkpoint), device="cpu")
    assert from_hub.predict([images[0]], ["a cat"]) == local.predict([images[0]], ["a cat"])


@pytest.mark.parametrize(
    "name,message",
    [
        ("someone/not-cached", "neither a local directory nor a Hugging Face Hub model"),
        ("runs/nothing/here", "checkpoint directory not found: runs/nothing/here"),  # a path, never a Hub id
        ("./best", "checkpoint directory not found: ./best"),
    ],
)
def test_unknown_checkpoint_is_a_checkpoint_error_naming_it(offline_hub, name, message):
    with pytest.raises(CheckpointError, match=message) as error:
        resolve_checkpoint(name)
    assert name in str(error.value)
