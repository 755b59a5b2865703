"""Checks on the committed sample dataset in ``data/sample`` and on its generator ``data/make_sample.py``.

Besides the schema, these tests verify the design properties that make the label columns useful tasks:
``match`` needs both modalities, ``background`` is image-only, ``tone`` is text-only, and the image-derived
labels (``area``, ``colors``, ``background``) agree with the pixels, as do the dense tasks' masks (``shapes``, and
``object``, the group the ``referral`` names).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SCRIPT = ROOT / "data" / "make_sample.py"
SPLIT_SIZES = {"train": 3000, "validation": 500, "test": 500}
SIZE_BUDGET = 8_000_000  # bytes of file content; `du -sh` reports more, as it rounds every file up to a block
# Upper 1e-5 quantiles of the chi-square distribution by degrees of freedom (scipy.stats.chi2.isf(1e-5, df)).
CHI2_CRITICAL = {1: 19.51, 2: 23.03, 3: 25.90, 4: 28.47, 5: 30.86, 6: 33.11}
MIN_FEATURE_COUNT = 40  # features seen fewer times are too rare to test


@pytest.fixture(scope="module")
def gen():
    """The generator script, imported from its file path."""
    spec = importlib.util.spec_from_file_location("make_sample", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The committed data loaded with ``datasets``, offline and with every cache in a temporary directory."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        import datasets

        return datasets.load_dataset("imagefolder", data_dir=str(SAMPLE), cache_dir=str(home / "datasets"))


@pytest.fixture(scope="module")
def rows(dataset):
    """Label rows (no images or masks) per split, as lists of dicts."""
    return {split: dataset[split].remove_columns(["image", "shapes", "object"]).to_list() for split in SPLIT_SIZES}


@pytest.fixture(scope="module")
def metadata() -> dict[str, list[dict]]:
    """The metadata.jsonl rows per split, as written (mask columns as `<column>_file_name` paths)."""
    return {
        split: [json.loads(line) for line in (SAMPLE / split / "metadata.jsonl").read_text().splitlines()]
        for split in SPLIT_SIZES
    }


@pytest.fixture(scope="module")
def all_rows(rows):
    """Label rows of every split together."""
    return [row for split in SPLIT_SIZES for row in rows[split]]


def words(caption: str) -> set[str]:
    """Lower-case words and word bigrams of a caption."""
    tokens = re.findall(r"[a-z]+", caption.lower())
    return set(tokens) | {" ".join(pair) for pair in zip(tokens, tokens[1:])}


def area_bin(area: float) -> str:
    """Coarse area bucket, so a float can be tested like a categorical feature."""
    return f"area<{min(b for b in (0.02, 0.04, 0.06, 0.09, 1.01) if area < b)}"


def image_features(row: dict) -> set[str]:
    """Image-derived label values of a row, as categorical features (missing labels are skipped)."""
    features = set()
    if row["colors"] is not None:
        features |= {f"color={c}" for c in row["colors"]} | {f"n_colors={len(row['colors'])}"}
    if row["area"] is not None:
        features.add(area_bin(row["area"]))
    if row["background"] is not None:
        features.add(f"background={row['background']}")
    return features


def dependent_features(samples: list[tuple[set[str], object]]) -> dict[str, float]:
    """Features whose label distribution differs from the overall one (chi-square test at p < 1e-5).

    ``samples`` holds (features, label) pairs; for each feature seen at least ``MIN_FEATURE_COUNT`` times the
    label counts among rows with the feature are compared to the overall label frequencies.
    """
    overall = Counter(label for _, label in samples)
    labels = sorted(overall, key=str)
    frequency = np.array([overall[label] for label in labels]) / len(samples)
    by_feature = defaultdict(Counter)
    for features, label in samples:
        for feature in features:
            by_feature[feature][label] += 1
    flagged = {}
    for feature, counts in by_feature.items():
        observed = np.array([counts[label] for label in labels])
        if observed.sum() < MIN_FEATURE_COUNT:
            continue
        expected = frequency * observed.sum()
        statistic = float(((observed - expected) ** 2 / expected).sum())
        if statistic > CHI2_CRITICAL[len(labels) - 1]:
            flagged[feature] = round(statistic, 1)
    return flagged


def naive_bayes_accuracy(train: list[tuple[set[str], object]], test: list[tuple[set[str], object]]) -> float:
    """Accuracy on ``test`` of a Bernoulli naive Bayes classifier fitted on ``train`` (features, label) pairs."""
    vocabulary = sorted({f for features, _ in train for f in features})
    labels = sorted({label for _, label in train}, key=str)

    def encode(samples):
        matrix = np.zeros((len(samples), len(vocabulary)))
        index = {f: i for i, f in enumerate(vocabulary)}
        for row, (features, _) in enumerate(samples):
            matrix[row, [index[f] for f in features if f in index]] = 1
        return matrix, np.array([labels.index(label) for _, label in samples])

    x_train, y_train = encode(train)
    x_test, y_test = encode(test)
    p = np.stack([(x_train[y_train == k].sum(0) + 1) / ((y_train == k).sum() + 2) for k in range(len(labels))])
    prior = np.log(np.bincount(y_train, minlength=len(labels)) / len(y_train))
    scores = prior + x_test @ np.log(p).T + (1 - x_test) @ np.log(1 - p).T
    return float((scores.argmax(1) == y_test).mean())


def pixel_labels(image: Image.Image, gen) -> dict:
    """Recover ``area``, ``colors`` and ``background`` from the pixels alone.

    Objects use the exact palette colours; every other pixel is background, in one colour (plain) or two, where
    the lighter texture colour covers under a third of the background for dots and more for stripes.
    """
    codes = np.asarray(image).reshape(-1, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    palette = {r << 16 | g << 8 | b: name for name, (r, g, b) in gen.COLORS.items()}
    is_object = np.isin(codes, list(palette))
    background, counts = np.unique(codes[~is_object], return_counts=True)
    if len(background) == 1:
        kind = "plain"
    else:  # the texture colour is the base colour lifted on every channel, so its code is the larger one
        kind = "dots" if counts[background.argmax()] / counts.sum() < 1 / 3 else "stripes"
    return {
        "area": round(is_object.mean(), 4),
        "colors": sorted(palette[code] for code in np.unique(codes[is_object])),
        "background": kind,
    }


def test_splits_sizes_and_features(dataset):
    import datasets

    assert {split: dataset[split].num_rows for split in dataset} == SPLIT_SIZES
    features = dataset["train"].features
    assert isinstance(features["image"], datasets.Image)
    names = ("caption", "match", "background", "tone", "area", "referral")
    assert {name: features[name].dtype for name in names} == {
        "caption": "string",
        "match": "bool",
        "background": "string",
        "tone": "string",
        "area": "float64",
        "referral": "string",
    }
    assert isinstance(features["shapes"], datasets.Image) and isinstance(features["object"], datasets.Image)
    list_types = (getattr(datasets, "List", datasets.Sequence), datasets.Sequence)  # `List` is new in datasets 4
    assert isinstance(features["colors"], list_types) and features["colors"].feature.dtype == "string"
    for split in SPLIT_SIZES:
        assert dataset[split].features == features


def test_images_are_64px_rgb(dataset):
    for split in SPLIT_SIZES:
        for image in dataset[split].select(range(5))["image"]:
            assert (image.mode, image.size) == ("RGB", (64, 64))


def test_values_are_well_formed(rows, all_rows, gen):
    for split in SPLIT_SIZES:
        assert all(isinstance(row["match"], bool) for row in rows[split])
    for row in all_rows:
        assert isinstance(row["caption"], str) and row["caption"].strip()
        assert row["background"] in (*gen.BACKGROUNDS, None)
        assert row["tone"] in (*gen.TONES, None)
        assert row["area"] is None or 0 < row["area"] < 1
        if row["colors"] is not None:
            assert row["colors"] and row["colors"] == sorted(set(row["colors"]))
            assert set(row["colors"]) <= set(gen.COLORS)


def test_area_is_always_written_as_json_float():
    for split in SPLIT_SIZES:
        text = (SAMPLE / split / "metadata.jsonl").read_text()
        values = re.findall(r'"area": ([^,}]+)', text)
        assert len(values) == SPLIT_SIZES[split]
        assert all(re.fullmatch(r"null|0\.\d{1,4}", value) for value in values)


@pytest.mark.parametrize("column", ["background", "tone", "area", "colors"])
def test_about_15_percent_of_labels_are_missing(rows, column):
    for split in SPLIT_SIZES:
        missing = np.mean([row[column] is None for row in rows[split]])
        assert 0.10 <= missing <= 0.20, (split, missing)


@pytest.mark.parametrize("column", ["shapes", "object"])
def test_about_15_percent_of_masks_are_missing_and_the_rest_exist(metadata, column):
    for split, lines in metadata.items():
        files = [row[f"{column}_file_name"] for row in lines]
        assert 0.10 <= np.mean([file is None for file in files]) <= 0.20, split
        assert all((SAMPLE / split / file).is_file() for file in files if file is not None)
        assert len(list((SAMPLE / split / "masks").glob(f"*_{column}.png"))) == sum(f is not None for f in files)


def test_masks_agree_with_the_pixels_and_the_referral(metadata, gen):
    """The shapes mask covers exactly the object pixels (palette colours), its ids are the scene's shapes, and the
    object mask is exactly the pixels of the colour and shape the referral names."""
    checked = 0
    for index, row in enumerate(metadata["validation"]):
        if row["shapes_file_name"] is None or row["object_file_name"] is None:
            continue
        image = np.asarray(Image.open(SAMPLE / "validation" / row["file_name"]))
        shapes = Image.open(SAMPLE / "validation" / row["shapes_file_name"])
        named = Image.open(SAMPLE / "validation" / row["object_file_name"])
        assert shapes.mode == named.mode == "P" and shapes.size == named.size == (64, 64)
        shapes, named = np.asarray(shapes), np.asarray(named)
        codes = image.reshape(64, 64, 3).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
        colour_codes = {name: r << 16 | g << 8 | b for name, (r, g, b) in gen.COLORS.items()}
        assert np.array_equal(shapes > 0, np.isin(codes, list(colour_codes.values())))
        scene = gen.make_example(0, "validation", index).image_scene
        assert set(np.unique(shapes)) - {0} == {gen.SHAPE_IDS[group.shape] for group in scene}
        colour, shape = next((c, s) for c in gen.COLORS for s in gen.SHAPES if f"{c} {s}" in row["referral"])
        expected = (codes == colour_codes[colour]) & (shapes == gen.SHAPE_IDS[shape])
        assert expected.any() and np.array_equal(named, expected.astype(np.uint8))
        checked += 1
    assert checked > 300


def test_classes_are_roughly_balanced(rows, all_rows, gen):
    for split in SPLIT_SIZES:
        assert 0.45 <= np.mean([row["match"] for row in rows[split]]) <= 0.55
    for column, classes in (("background", gen.BACKGROUNDS), ("tone", gen.TONES)):
        counts = Counter(row[column] for row in all_rows if row[column] is not None)
        assert set(counts) == set(classes)
        assert max(counts.values()) / min(counts.values()) < 1.2


def test_caption_says_nothing_about_match(rows, all_rows):
    assert dependent_features([(words(row["caption"]), row["match"]) for row in all_rows]) == {}
    held_out = rows["validation"] + rows["test"]
    accuracy = naive_bayes_accuracy(
        [(words(r["caption"]), r["match"]) for r in rows["train"]],
        [(words(r["caption"]), r["match"]) for r in held_out],
    )
    assert abs(accuracy - 0.5) < 0.06


def test_image_labels_say_nothing_about_match(all_rows):
    assert dependent_features([(image_features(row), row["match"]) for row in all_rows]) == {}


def test_caption_says_nothing_about_background(rows, all_rows, gen):
    vocabulary = set().union(*(words(row["caption"]) for row in all_rows))
    assert not vocabulary & {"plain", "stripes", "striped", "stripe", "dots", "dotted", "background"}
    labelled = [row for row in all_rows if row["background"] is not None]
    assert dependent_features([(words(row["caption"]), row["background"]) for row in labelled]) == {}
    train = [(words(r["caption"]), r["background"]) for r in rows["train"] if r["background"]]
    held_out = [(words(r["caption"]), r["background"]) for r in rows["validation"] + rows["test"] if r["background"]]
    assert abs(naive_bayes_accuracy(train, held_out) - 1 / len(gen.BACKGROUNDS)) < 0.07


def test_image_says_nothing_about_tone(all_rows):
    labelled = [row for row in all_rows if row["tone"] is not None]
    assert dependent_features([(image_features(row), row["tone"]) for row in labelled]) == {}


def test_caption_determines_tone(rows):
    train = [(words(r["caption"]), r["tone"]) for r in rows["train"] if r["tone"]]
    held_out = [(words(r["caption"]), r["tone"]) for r in rows["validation"] + rows["test"] if r["tone"]]
    assert naive_bayes_accuracy(train, held_out) > 0.95


def test_image_derived_labels_agree_with_pixels(dataset, gen):
    for row in dataset["validation"]:
        recovered = pixel_labels(row["image"], gen)
        for column, value in recovered.items():
            assert row[column] is None or row[column] == value, (column, row[column], value)


def test_false_captions_change_exactly_one_attribute(rows, gen):
    for index, row in enumerate(rows["train"][:300]):
        example = gen.make_example(0, "train", index)
        assert example.row["match"] == row["match"]
        changes = [
            (a, b)
            for said, shown in zip(example.caption_scene, example.image_scene)
            for a, b in zip(astuple(said), astuple(shown))
            if a != b
        ]
        assert len(changes) == (0 if row["match"] else 1)


def test_objects_never_overlap_even_without_jitter(gen):
    for first in gen.POSITIONS:
        for second in gen.POSITIONS:
            groups = [gen.Group(2, "red", "circle", "large", first), gen.Group(2, "blue", "star", "large", second)]
            scene = tuple(groups[: 1 if first == second else 2])
            assert gen.fits(gen.place_objects(scene, [(0, 0)] * len(scene))), scene


def test_regenerated_rows_equal_committed_rows(gen):
    for split, size in SPLIT_SIZES.items():
        lines = (SAMPLE / split / "metadata.jsonl").read_text().splitlines(keepends=True)
        for index in (0, 1, size - 1):
            example = gen.make_example(0, split, index)
            assert gen.metadata_line(example.row) == lines[index]
            committed = np.asarray(Image.open(SAMPLE / split / example.row["file_name"]))
            assert np.array_equal(np.asarray(example.image), committed)
            for column, mask in example.masks.items():
                if example.row[f"{column}_file_name"] is not None:
                    committed = (SAMPLE / split / example.row[f"{column}_file_name"]).read_bytes()
                    assert gen.png_bytes(mask) == committed


def test_generation_is_byte_identical(gen, tmp_path):
    for run in ("first", "second"):
        gen.main(["--out", str(tmp_path / run), "--seed", "3", "--train", "4", "--validation", "2", "--test", "2"])
    files = sorted(p.relative_to(tmp_path / "first") for p in (tmp_path / "first").rglob("*") if p.is_file())
    rows = [
        json.loads(line)
        for split in ("train", "validation", "test")
        for line in open(tmp_path / "first" / split / "metadata.jsonl")
    ]
    masks = sum(row[f"{column}_file_name"] is not None for row in rows for column in ("shapes", "object"))
    assert masks > 0 and len(files) == 4 + 2 + 2 + 3 + masks
    for file in files:
        assert (tmp_path / "first" / file).read_bytes() == (tmp_path / "second" / file).read_bytes()


def test_sample_fits_size_budget():
    assert sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file()) < SIZE_BUDGET
