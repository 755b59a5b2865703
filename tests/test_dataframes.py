"""pandas DataFrames: load_splits takes them (paths, bytes, PIL images), Predictor.predict returns one on the same
index, and Predictor.evaluate / mmfusion.evaluate give the metrics of `mmfusion evaluate` on the same rows."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from helpers import SAMPLE, sample_checkpoint
from PIL import Image

import mmfusion
from mmfusion.cli import main
from mmfusion.config import DataConfig
from mmfusion.data import load_splits
from mmfusion.errors import BadInputError, DataError
from mmfusion.predictor import Predictor
from mmfusion.rows import RowReader

TEST = SAMPLE / "test"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return sample_checkpoint(tmp_path_factory.mktemp("run") / "best", fusion="gated")


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return Predictor.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def test_rows() -> pd.DataFrame:
    """The sample test split as a DataFrame, images as paths relative to its directory."""
    return pd.read_json(TEST / "metadata.jsonl", lines=True, dtype=False).rename(columns={"file_name": "image"})


def png_bytes(name: str) -> bytes:
    return (TEST / name).read_bytes()


def mixed_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Eight rows, the image as a path, bytes, a PIL image or missing (None, NaN); one text missing; a string index."""
    frame = rows.head(8).copy()
    names = list(frame["image"])
    pil = [Image.open(TEST / names[2]), Image.open(TEST / names[6]).convert("RGB")]
    frame["image"] = [names[0], png_bytes(names[1]), pil[0], None, names[4], png_bytes(names[5]), pil[1], math.nan]
    frame.loc[frame.index[4], "caption"] = None
    frame.index = [f"id{i}" for i in range(8)]
    return frame


def test_load_splits_reads_paths_bytes_and_pil_images_to_the_same_pixels(predictor, test_rows):
    config = DataConfig(image_root=str(TEST), missing_modality="placeholder")
    frame = mixed_frame(test_rows)
    loaded = load_splits({"test": frame, "train": test_rows.head(3)}, config, for_training=False)
    assert sorted(loaded.splits) == ["test", "train"] and loaded.source == "dict of DataFrames"
    reader = RowReader(predictor.processor, [], config, loaded.roots["test"], "test", allow_missing_modality=True)
    rows = [reader.read(row, i) for i, row in enumerate(loaded.splits["test"])]
    names = list(test_rows["image"].head(8))
    for i in (0, 1, 2, 4, 5, 6):  # path, bytes, PIL (palette and RGB): each the file's pixels exactly
        expected = predictor.processor.image_tensor(Image.open(TEST / names[i]).convert("RGB"))
        assert torch.equal(rows[i]["pixel_values"], expected), i
    assert [row["image_present"] for row in rows] == [True, True, True, False, True, True, True, False]
    assert [row["text_present"] for row in rows] == [True] * 4 + [False] + [True] * 3
    single = load_splits(frame, config, for_training=False)
    assert list(single.splits) == ["train"] and single.source == "DataFrame"


def test_bad_frames_are_named(test_rows):
    frame = test_rows.head(3).copy()
    frame["image"] = ["00000.png", 5, None]
    frame.index = ["a", "b", "c"]
    with pytest.raises(BadInputError, match=r"^DataFrame row 'b', field 'image': expected an image path, bytes or"):
        load_splits(frame, DataConfig(), for_training=False)
    with pytest.raises(DataError, match=r"expected a dict of pandas DataFrames per split, got \['test: list'\]"):
        load_splits({"train": frame, "test": [1, 2]}, DataConfig(), for_training=False)


def test_predict_on_a_frame_is_the_list_prediction_on_its_index(predictor, test_rows):
    frame = mixed_frame(test_rows)
    result = predictor.predict(frame, image_root=TEST)
    assert list(result.index) == list(frame.index)
    images = [None if not isinstance(v, (str, bytes, Image.Image)) else v for v in frame["image"]]
    texts = [None if not isinstance(t, str) else t for t in frame["caption"]]
    expected = predictor.predict(images, texts, image_root=TEST)
    tasks = {spec.name: spec for spec in predictor.tasks}
    scores = {task: [f"{task}_score_{label}" for label in spec.labels or []] for task, spec in tasks.items()}
    assert scores["match"] == ["match_score_False", "match_score_True"]
    order = ["area", "background", "colors", "match", "tone"]
    assert list(result.columns) == [column for task in order for column in [task, *scores[task]]] + ["pair"]
    for (_, row), want in zip(result.iterrows(), expected):
        assert row["area"] == want["area"]["value"]
        assert row["background"] == want["background"]["label"]
        assert row["background_score_dots"] == want["background"]["scores"]["dots"]
        assert row["colors"] == want["colors"]["labels"]
        assert row["colors_score_red"] == want["colors"]["scores"]["red"]
        assert row["pair"] == want["pair"]["score"] or (math.isnan(row["pair"]) and want["pair"]["score"] is None)
    assert result["pair"].isna().tolist() == [False] * 3 + [True, True] + [False] * 2 + [True]  # a modality missing
    renamed = frame.rename(columns={"image": "photo", "caption": "words"})
    named = predictor.predict(renamed, image_root=TEST, image_column="photo", text_column="words")
    pd.testing.assert_frame_equal(named, result)
    with pytest.raises(DataError, match=r"DataFrame has no column 'caption' \(text_column\); its columns are"):
        predictor.predict(frame.drop(columns="caption"), image_root=TEST)


def test_evaluate_on_a_frame_equals_the_cli(checkpoint, predictor, test_rows, tmp_path):
    output = tmp_path / "metrics.json"
    code = main(["evaluate", str(checkpoint), "--data.path", str(SAMPLE), "--split", "test", "--output", str(output)])
    assert code == 0
    cli = json.loads(output.read_text())["metrics"]
    frame = test_rows.assign(image=[str(TEST / name) for name in test_rows["image"]])
    assert predictor.evaluate(frame) == cli
    assert mmfusion.evaluate(checkpoint, str(SAMPLE), split="test") == cli
    with_bytes = test_rows.assign(photo=[png_bytes(name) for name in test_rows["image"]]).drop(columns="image")
    assert mmfusion.evaluate(checkpoint, {"test": with_bytes}, image_column="photo") == cli
