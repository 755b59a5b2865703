"""The benchmark suite (benchmarks/suite): every set generates at a tiny scale, is deterministic, loads in mmfusion
with its tasks.yaml, and its claims about what each modality determines hold on its generator."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfusion.data import check_columns, fit_tasks, infer_tasks, load_splits
from mmfusion.options import load_yaml
from mmfusion.processing import FusionProcessor, ProcessorSettings, train_tokenizer
from mmfusion.rows import RowReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the `suite` package

from suite import SETS, catalog, clutter, generate, spatial, textures
from suite.base import SPLITS
from suite.ceilings import markdown, set_ceilings
from suite.draw import PALETTE, font_names
from suite.make import main as make_main

SCALE = 0.01
NAMES = sorted(SETS)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("suite")
    return {name: generate(name, out, SCALE) for name in NAMES}


def records(path: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (path / split / "metadata.jsonl").read_text().splitlines()]


def split_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for split in SPLITS for p in sorted((path / split).iterdir())}


def test_there_are_six_sets_covering_every_task_type_and_size_range():
    assert NAMES == ["catalog", "clutter", "glyphs", "scenes", "spatial", "textures"]
    types = {task.type for spec in SETS.values() for task in spec.tasks}
    assert types == {"classification", "multilabel", "regression", "matching"}
    rows = [sum(spec.sizes().values()) for spec in SETS.values()]
    assert min(rows) >= 1000 and max(rows) == 20000
    sides = sorted(spec.image_size for spec in SETS.values())
    assert sides[0] == 32 and sides[-1] == 128 and len(set(sides)) == len(sides)
    for spec in SETS.values():
        needs = [task.needs for task in spec.tasks]
        assert "both" in needs and "image" in needs, spec.name


@pytest.mark.parametrize("name", NAMES)
def test_splits_columns_and_images(generated, name):
    spec, path = SETS[name], generated[name]
    columns = {"file_name", spec.text_column} | {t.name for t in spec.tasks if t.label is not None}
    for split, size in spec.sizes(SCALE).items():
        rows = records(path, split)
        assert len(rows) == size
        for row in rows:
            assert set(row) == columns
            assert isinstance(row[spec.text_column], str) and row[spec.text_column].strip()
            with Image.open(path / split / row["file_name"]) as image:
                assert (image.mode, image.size) == ("RGB", (spec.image_size, spec.image_size))
            for task in spec.tasks:
                value = row.get(task.name)
                if task.label is None or value is None:
                    continue
                if task.type == "classification":
                    assert value in task.classes
                elif task.type == "multilabel":
                    assert set(value) <= set(task.classes) and value == sorted(set(value), key=value.index)
                else:
                    assert isinstance(value, float)


@pytest.mark.parametrize("name", NAMES)
def test_generation_is_deterministic(generated, tmp_path, name):
    again = generate(name, tmp_path, SCALE)
    assert again != generated[name]
    first, second = split_files(generated[name]), split_files(again)
    assert len(first) == sum(SETS[name].sizes(SCALE).values()) + 3
    assert first == second


@pytest.mark.parametrize("name", NAMES)
def test_rows_without_images_are_the_written_rows(generated, name):
    """Ceilings are measured on rows made without drawing: they must be the rows written."""
    spec = SETS[name]
    for split in SPLITS:
        made = [spec.make_row(split, i, render=False).record for i in range(spec.sizes(SCALE)[split])]
        assert made == records(generated[name], split)


def test_a_generated_set_is_left_alone_and_another_scale_replaces_it(tmp_path):
    path = generate("scenes", tmp_path, SCALE)
    metadata = path / "train" / "metadata.jsonl"
    before = metadata.stat().st_mtime_ns
    metadata.write_text(metadata.read_text())  # touched: a regenerated file would be rewritten again
    touched = metadata.stat().st_mtime_ns
    assert generate("scenes", tmp_path, SCALE) == path
    assert metadata.stat().st_mtime_ns == touched >= before
    generate("scenes", tmp_path, 0.02)
    assert len(records(path, "train")) == SETS["scenes"].sizes(0.02)["train"] == 20
    assert json.loads((path / "stamp.json").read_text())["scale"] == 0.02
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("name", NAMES)
def test_tasks_yaml_loads_and_mmfusion_reads_the_set(generated, name):
    spec, path = SETS[name], generated[name]
    config = load_yaml(path / "tasks.yaml")
    assert (config.data.path, config.data.text_column) == (str(path), spec.text_column)
    assert config.model.image_size == spec.image_size
    assert [(t.name, t.type) for t in config.tasks] == [(t.name, t.type) for t in spec.tasks]
    loaded = load_splits(config.data.path, config.data)
    assert sorted(loaded.splits) == sorted(SPLITS)
    for split in SPLITS:
        check_columns(loaded.splits[split], split, config.tasks, config.data)
    train = loaded.splits["train"]
    fitted = fit_tasks(config.tasks, train, config.data)
    inferred = {t.name: t.type for t in infer_tasks(train, config.data)[0]}
    for task, declared in zip(fitted, spec.tasks):
        if task.type != "matching":
            assert inferred[task.column] == task.type
        if task.type in ("classification", "multilabel"):
            assert set(task.labels) <= {str(c) for c in declared.classes}
    processor = FusionProcessor(train_tokenizer(train[spec.text_column]), ProcessorSettings(image_size=spec.image_size))
    item = RowReader(processor, fitted, config.data, loaded.roots["train"], "train").read(train[0], 0)
    assert item["pixel_values"].shape == (3, spec.image_size, spec.image_size)
    assert set(item["labels"]) == {t.name for t in spec.tasks}


@pytest.mark.parametrize("name", NAMES)
def test_what_each_modality_determines(name):
    """Image-read labels ignore the text; labels needing both change with the text for some images; a text-read
    label ignores the image."""
    spec = SETS[name]
    rng = np.random.default_rng(7)
    latents = spec.latents(300, seed=5)
    for task in (t for t in spec.tasks if t.label is not None):
        with_new_text = [task.label(s, spec.module.sample_query(s, rng)) != task.label(s, q) for s, q in latents]
        if task.needs == "image":
            assert not any(with_new_text), task.name
        elif task.needs == "both":
            assert sum(with_new_text) > 30, task.name
        else:
            assert all(task.label(spec.module.sample_scene(rng), q) == task.label(s, q) for s, q in latents)


@pytest.mark.parametrize("name", NAMES)
def test_ceilings_need_both_modalities_where_claimed(name):
    result = set_ceilings(SETS[name], scale=0.1, samples=2000)
    for task, c in result["tasks"].items():
        assert c["perfect"] <= 1.0 + 1e-9 and c["count"] > 0
        if c["type"] == "matching":  # a perfect model retrieves among pairs alike; one modality alone guesses
            assert c["perfect"] > 5 * c["image"] and c["image"] == c["text"] == 1 / c["count"], (task, c)
        elif c["needs"] == "both":
            assert c["perfect"] > max(c["image"], c["text"]) + 0.15, (task, c)
        else:
            assert c[c["needs"]] == pytest.approx(c["perfect"]), (task, c)
    assert f"| {name} | " in markdown({name: result})


def test_label_noise_keeps_the_perfect_ceiling_below_one():
    result = set_ceilings(SETS["textures"], scale=0.1, samples=2000)["tasks"]
    assert 0.8 < result["pattern"]["perfect"] < 0.95  # 10 % of the pattern labels are wrong
    assert result["period"]["perfect"] == pytest.approx(1.0)
    assert result["true"]["text"] < 0.6 and result["true"]["image"] < 0.6


@pytest.mark.parametrize("module", [clutter, spatial])
def test_object_colours_in_the_pixels_are_the_scene_colours(module):
    spec = SETS[module.NAME]
    colours = {value: name for name, value in PALETTE.items()}
    for index in range(20):
        row = spec.make_row("train", index)
        pixels = {tuple(int(v) for v in p) for p in np.asarray(row.image).reshape(-1, 3)}
        assert {colours[p] for p in pixels if p in colours} == {item.color for item in row.scene}


@pytest.mark.parametrize("pattern", textures.PATTERNS)
def test_texture_shows_its_period(pattern):
    rng = np.random.default_rng(0)
    for period in textures.PERIODS:
        mask = textures.texture(textures.Scene(pattern, period), rng)
        if pattern in ("speckle", "rings"):
            assert mask.any() and not mask.all()
            continue
        axes = {"stripes": [1], "bands": [0]}.get(pattern, [0, 1])
        for axis in axes:
            shifted = np.take(mask, range(period, mask.shape[axis]), axis=axis)
            assert np.array_equal(np.take(mask, range(mask.shape[axis] - period), axis=axis), shifted)
            for shorter in range(1, period):
                start = np.take(mask, range(mask.shape[axis] - shorter), axis=axis)
                assert not np.array_equal(start, np.take(mask, range(shorter, mask.shape[axis]), axis=axis))


@pytest.mark.parametrize("name", ["spatial", "textures"])
def test_negation_flips_the_answer(name):
    spec = SETS[name]
    task = spec.tasks[0]
    for scene, query in spec.latents(100, seed=3):
        assert task.label(scene, replace(query, negated=not query.negated)) != task.label(scene, query)


def test_negation_flips_the_review_sentiment():
    for word in catalog.POSITIVE + catalog.NEGATIVE:
        plain = catalog._sentiment(None, catalog.Query(2, word, negated=False))
        negated = catalog._sentiment(None, catalog.Query(2, word, negated=True))
        assert {plain, negated} == {"positive", "negative"}
        assert plain == ("positive" if word in catalog.POSITIVE else "negative")


def test_glyph_fonts_are_recorded(generated):
    stamp = json.loads((generated["glyphs"] / "stamp.json").read_text())
    assert stamp["fonts"] == font_names() and stamp["fonts"]
    assert "(version 1, seed 102, scale 0.01)" in (generated["glyphs"] / "tasks.yaml").read_text()


def test_make_command_line(tmp_path, capsys):
    make_main(["--out", str(tmp_path), "--only", "spatial", "--scale", "0.01"])
    assert "| spatial | 60 |" in capsys.readouterr().out
    assert load_yaml(tmp_path / "spatial" / "tasks.yaml").data.path == str(tmp_path / "spatial")
    with pytest.raises(SystemExit):
        make_main(["--out", str(tmp_path), "--scale", "0"])
