"""Frozen-encoder feature cache: a cached run makes the same fusion and head updates as the uncached frozen run, the
cache is reused, and its key follows the data, the processor and the encoder weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import make_imagefolder, make_rows, tiny_config
from safetensors.torch import load_file
from test_train import TINY, _run

from mmfusion import Config, FusionModel
from mmfusion.config import DataConfig
from mmfusion.feature_cache import FeatureCollator, cache_key, cached_dataset, wanted, weights_digest
from mmfusion.prepare import build_splits
from mmfusion.rows import Collator


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache_data")
    make_imagefolder(root, {"train": make_rows(24), "validation": make_rows(8, 100)})
    return root


def _train_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["losses"]["loss"] for r in records if r["split"] == "train"]


@pytest.mark.parametrize(
    "fusion,extra",
    [("concat", []), ("cross_attention", ["--model.fusion_heads", "2", "--train.modality_dropout", "0.3"])],
)
def test_cached_run_makes_the_uncached_frozen_runs_updates(data, tmp_path, capsys, fusion, extra):
    """concat reads pooled vectors only (all the cache then holds); cross_attention reads tokens, and modality
    dropout still drops a modality per row and epoch."""
    frozen = "--model.freeze_image true --model.freeze_text true --data.augment false --model.dropout 0"
    common = ["--data.path", str(data), *TINY, *f"--train.max_steps 6 --train.log_every 1 {frozen}".split()]
    common += ["--model.fusion", fusion, *extra]
    assert _run([*common, "--train.cache_features", "false", "--train.output_dir", str(tmp_path / "plain")]) == 0
    assert "feature cache" not in capsys.readouterr().out
    assert _run([*common, "--train.output_dir", str(tmp_path / "cached")]) == 0  # unset: on, both encoders frozen
    printed = capsys.readouterr().out
    assert "feature cache: train: 24 rows, built" in printed and "feature cache: validation: 8 rows, built" in printed
    plain, cached = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("plain", "cached"))
    assert plain.keys() == cached.keys()
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)
    losses = _train_losses(tmp_path / "plain")
    assert _train_losses(tmp_path / "cached") == pytest.approx(losses, abs=1e-5) and len(set(losses)) == 6


def test_cache_is_reused_and_keyed_by_data_processor_and_weights(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MMFUSION_CACHE", str(tmp_path / "cache"))  # empty: not the one the runs above filled
    config = Config(
        model=tiny_config(freeze_image=True, freeze_text=True, fusion="cross_attention", tasks=[]),
        data=DataConfig(path=str(data)),
    )
    prepared = build_splits(config)
    config.tasks = prepared.tasks
    config.model = dataclasses.replace(config.model, **prepared.model_settings)
    torch.manual_seed(0)
    model = FusionModel(config.model_config())
    train = prepared.datasets["train"]
    cached, note = cached_dataset(model, train)
    assert note.startswith("train: 24 rows, built in")
    assert cached_dataset(model, train)[1].startswith("train: 24 rows, reused (")
    key = cache_key(model, train)
    assert cache_key(model, prepared.datasets["validation"]) != key
    weight = model.image_encoder.features[0].weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0, 0, 0] += 1.0
    assert cache_key(model, train) != key
    with torch.no_grad():
        weight.copy_(original)
    assert cache_key(model, train) == key
    settings = train.reader.processor.settings
    mean, settings.mean = settings.mean, (0.5, 0.5, 0.5)
    assert cache_key(model, train) != key
    settings.mean = mean

    train.augment = False  # the cache holds each row's encoder outputs, in row order, as evaluation reads them
    batch = Collator(0)([train[i] for i in range(len(train))])
    with torch.no_grad():
        expected = model.eval().encoder_outputs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    for index in (0, 3, len(train) - 1):
        features, length = cached[index]["features"], int(batch["attention_mask"][index].sum())
        torch.testing.assert_close(features["image.pooled"], expected["image"].pooled[index], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(features["image.tokens"], expected["image"].tokens[index], atol=1e-6, rtol=1e-5)
        tokens = expected["text"].tokens[index, :length]
        torch.testing.assert_close(features["text.tokens"][:length], tokens, atol=1e-6, rtol=1e-5)
        assert features["text.mask"][:length].all() and not features["text.mask"][length:].any()


def test_weights_digest_covers_normalisation_statistics():
    """BatchNorm buffers count too: a CNN's running statistics change its outputs."""
    model = FusionModel(tiny_config(image_encoder="timm", image_model="test_resnet"))
    digest = weights_digest(model)
    with torch.no_grad():
        model.image_encoder.model.bn1.running_mean[0] += 1.0
    assert weights_digest(model) != digest and len(digest) == 64


def test_cache_is_used_when_both_encoders_are_frozen_unless_told():
    model = FusionModel(tiny_config(freeze_image=True, freeze_text=True))
    assert wanted(None, model, streaming=False) and not wanted(None, model, streaming=True)
    assert not wanted(False, model, streaming=False)
    trains_text = FusionModel(tiny_config(freeze_image=True))
    assert not wanted(None, trains_text, streaming=False) and wanted(True, trains_text, streaming=False)


def test_collator_cuts_texts_to_the_longest_present_text():
    def row(length: int, present: bool) -> dict:
        mask = torch.arange(6) < length
        features = {
            "image.pooled": torch.ones(4),
            "image.tokens": torch.ones(2, 4),
            "image.mask": torch.ones(2) > 0,
            "text.pooled": torch.ones(4),
            "text.tokens": torch.ones(6, 4),
            "text.mask": mask,
        }
        return {
            "row": 0,
            "features": features,
            "image_present": True,
            "text_present": present,
            "labels": {},
            "label_mask": {},
        }

    batch = FeatureCollator()([row(3, True), row(5, False), row(2, True)])
    text = batch["features"]["text"]
    assert text["tokens"].shape == (3, 3, 4) and text["mask"].sum(1).tolist() == [3, 3, 2]
    assert batch["features"]["image"]["tokens"].shape == (3, 2, 4) and batch["text_present"].tolist() == [1, 0, 1]
