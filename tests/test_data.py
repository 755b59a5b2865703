"""Loaders for every supported layout, task inference, label maps, row checks, collate."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from helpers import make_imagefolder, make_rows, write_image
from PIL import Image

from mmfusion.config import DataConfig, TaskSpec
from mmfusion.data import check_columns, fit_tasks, infer_tasks, load_splits
from mmfusion.errors import BadInputError, DataError
from mmfusion.processing import FusionProcessor, train_tokenizer
from mmfusion.rows import Collator, FusionDataset, RowReader, SkipReport, check_split


def _config(path, **overrides) -> DataConfig:
    return DataConfig(path=str(path), **{"image_column": "image", "text_column": "caption", **overrides})


def _first_images(loaded, config, tasks) -> list[torch.Tensor]:
    processor = FusionProcessor(train_tokenizer(["happy sad calm picture number"]))
    reader = RowReader(processor, tasks, config, loaded.roots["train"], "train")
    rows = list(loaded.splits["train"])[:2] if loaded.streaming else [loaded.splits["train"][i] for i in range(2)]
    return [reader.read(row, i) for i, row in enumerate(rows)]


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_imagefolder_layout(tmp_path, metadata):
    make_imagefolder(tmp_path, metadata=metadata)
    config = _config(tmp_path)
    loaded = load_splits(tmp_path, config)
    assert sorted(loaded.splits) == ["train", "validation"]
    assert len(loaded.splits["train"]) == 12 and len(loaded.splits["validation"]) == 6
    assert loaded.roots["validation"] == tmp_path / "validation"
    tasks = fit_tasks([TaskSpec("label")], loaded.splits["train"], config)
    items = _first_images(loaded, config, tasks)
    # row 0 is blue: the blue channel is bright after normalisation, red is dark
    assert items[0]["pixel_values"][2].mean() > 1.0 > items[0]["pixel_values"][0].mean()
    assert items[0]["labels"]["label"].item() == tasks[0].labels.index("blue")


def _table_rows(root, with_bytes=False):
    rows = make_rows(10)
    for row in rows:
        write_image(root / "images" / row["file_name"], row.pop("_color"))
        row["image"] = f"images/{row.pop('file_name')}"
        if with_bytes:
            row["image"] = {"bytes": (root / row["image"]).read_bytes(), "path": None}
    return rows


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet", "parquet_bytes"])
def test_single_file_with_image_column(tmp_path, kind):
    rows = _table_rows(tmp_path, with_bytes=kind == "parquet_bytes")
    table = datasets.Dataset.from_list(rows)
    file = tmp_path / f"data.{kind.split('_')[0]}"
    if kind == "csv":
        table.remove_columns("tags").to_csv(file, index=False)
    elif kind == "jsonl":
        table.to_json(file)
    else:
        table.to_parquet(file)
    config = _config(file, val_fraction=0.3)
    loaded = load_splits(file, config)
    assert sorted(loaded.splits) == ["train", "validation"]
    assert len(loaded.splits["train"]) == 7 and len(loaded.splits["validation"]) == 3
    tasks = fit_tasks([TaskSpec("label")], loaded.splits["train"], config)
    assert _first_images(loaded, config, tasks)[0]["pixel_values"].shape == (3, 64, 64)


def test_directory_of_split_files_and_save_to_disk_and_python_objects(tmp_path):
    rows = _table_rows(tmp_path)
    table = datasets.Dataset.from_list(rows)
    table.to_json(tmp_path / "train.jsonl")
    table.select(range(4)).to_json(tmp_path / "validation.jsonl")
    config = _config(tmp_path)
    loaded = load_splits(tmp_path, config)
    assert {k: len(v) for k, v in loaded.splits.items()} == {"train": 10, "validation": 4}

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": table, "test": table.select(range(3))}).save_to_disk(saved)
    loaded = load_splits(saved, _config(saved, image_root=str(tmp_path)))
    assert {k: len(v) for k, v in loaded.splits.items()} == {"train": 9, "validation": 1, "test": 3}

    config = _config("unused", image_root=str(tmp_path))
    loaded = load_splits(datasets.DatasetDict({"train": table, "validation": table}), config)
    tasks = fit_tasks([TaskSpec("label")], loaded.splits["train"], config)
    assert len(_first_images(loaded, config, tasks)) == 2


def test_decoded_image_feature_is_read_through_our_checks(tmp_path):
    rows = _table_rows(tmp_path)
    for row in rows:
        row["image"] = str(tmp_path / row["image"])
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    config = _config("unused", image_root=str(tmp_path))
    loaded = load_splits(datasets.DatasetDict({"train": table, "validation": table}), config)
    assert isinstance(loaded.splits["train"].features["image"], datasets.Image)
    assert not loaded.splits["train"].features["image"].decode
    tasks = fit_tasks([TaskSpec("label")], loaded.splits["train"], config)
    assert _first_images(loaded, config, tasks)[1]["pixel_values"][0].mean() > 1.0  # row 1 is red


def test_streaming(tmp_path):
    make_imagefolder(tmp_path)
    config = _config(tmp_path, streaming=True)
    loaded = load_splits(tmp_path, config)
    assert loaded.streaming and isinstance(loaded.splits["train"], datasets.IterableDataset)
    assert len(list(loaded.splits["train"])) == 12
    tasks = fit_tasks([TaskSpec("label")], loaded.splits["train"], config)
    assert tasks[0].labels == ["blue", "red"]
    assert len(_first_images(loaded, config, tasks)) == 2


def test_held_out_validation_is_deterministic_and_seeded(tmp_path):
    rows = _table_rows(tmp_path)
    datasets.Dataset.from_list(rows * 5).to_json(tmp_path / "data.jsonl")
    config = _config(tmp_path / "data.jsonl", val_fraction=0.2)
    first = load_splits(config.path, config).splits["validation"]["caption"]
    again = load_splits(config.path, config).splits["validation"]["caption"]
    other = load_splits(config.path, _config(tmp_path / "data.jsonl", val_fraction=0.2, split_seed=1))
    assert len(first) == 10 and first == again and first != other.splits["validation"]["caption"]


def test_task_inference_from_column_types(tmp_path):
    make_imagefolder(tmp_path)
    config = _config(tmp_path)
    loaded = load_splits(tmp_path, config)
    tasks, notes = infer_tasks(loaded.splits["train"], config)
    assert {t.name: t.type for t in tasks} == {"label": "classification", "score": "regression", "tags": "multilabel"}
    assert any("'score' (float64) -> regression" in note for note in notes)
    fitted = {t.name: t for t in fit_tasks(tasks, loaded.splits["train"], config)}
    assert fitted["label"].labels == ["blue", "red"] and fitted["label"].num_labels == 2
    assert fitted["tags"].labels == ["blue", "calm", "happy", "red", "sad"]
    scores = [float(i % 5) / 4 for i in range(12)]
    assert fitted["score"].target_mean == pytest.approx(sum(scores) / 12)


def test_task_inference_leaves_out_free_text_but_keeps_many_classes():
    """Over 100 distinct strings averaging fewer than 20 rows each is free text (a second caption, a referral), not
    labels; 101 classes of 20 rows each are labels."""
    rows = 2020
    table = datasets.Dataset.from_dict(
        {
            "caption": ["a picture"] * rows,
            "referral": [f"the {i % 102} blue things" for i in range(rows)],
            "kind": [f"class {i % 101}" for i in range(rows)],
        }
    )
    tasks, notes = infer_tasks(table, _config("unused"))
    assert [(spec.name, spec.type) for spec in tasks] == [("kind", "classification")]
    assert (
        "column 'referral' (text, 102 distinct values) ignored: free text rather than labels; declare a "
        "classification task to train on it"
    ) in notes


def test_column_mapping_and_missing_columns(tmp_path):
    make_imagefolder(tmp_path)
    config = _config(tmp_path, text_column="caption")
    loaded = load_splits(tmp_path, config)
    spec = TaskSpec("colour", column="label")
    fitted = fit_tasks([spec], loaded.splits["train"], config)
    assert fitted[0].name == "colour" and fitted[0].labels == ["blue", "red"]
    with pytest.raises(
        DataError, match=r"data.text_column 'text' not found; the data has columns \['image', 'caption'"
    ):
        check_columns(loaded.splits["train"], "train", fitted, _config(tmp_path, text_column="text"))
    with pytest.raises(DataError, match="column 'nope' not found; the data has columns"):
        fit_tasks([TaskSpec("x", column="nope")], loaded.splits["train"], config)


def test_missing_path_empty_dir_no_train_split(tmp_path):
    with pytest.raises(DataError, match="data.path does not exist: .*nowhere"):
        load_splits(tmp_path / "nowhere", _config(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no data found"):
        load_splits(tmp_path, _config(tmp_path))
    make_imagefolder(tmp_path / "d", {"validation": make_rows(3)})
    with pytest.raises(DataError, match=r"no train split; found splits \['validation'\]"):
        load_splits(tmp_path / "d", _config(tmp_path / "d"))


def test_empty_split(tmp_path):
    make_imagefolder(tmp_path, {"train": make_rows(4)})
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "metadata.jsonl").write_text("")
    with pytest.raises(DataError, match="the test split is empty|could not be read"):
        load_splits(tmp_path, _config(tmp_path))


# ----- bad rows -----


def _checked(tmp_path, mutate, on_error="raise", tasks=None, **config_overrides):
    rows = make_rows(6)
    make_imagefolder(tmp_path, {"train": make_rows(6), "validation": rows})
    mutate(tmp_path / "validation", rows)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    (tmp_path / "validation" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in public))
    config = _config(tmp_path, on_error=on_error, **config_overrides)
    loaded = load_splits(tmp_path, config)
    tasks = fit_tasks(tasks or [TaskSpec("label"), TaskSpec("score", "regression")], loaded.splits["train"], config)
    processor = FusionProcessor(train_tokenizer(["picture"]))
    reader = RowReader(processor, tasks, config, loaded.roots["validation"], "validation")
    report = SkipReport()
    kept = check_split(loaded.splits["validation"], "validation", reader, report, on_error)
    return kept, report


def _set(field, value, row=2):
    def mutate(directory, rows):
        rows[row][field] = value

    return mutate


BAD_ROWS = {
    "missing image": (
        _set("file_name", "gone.png"),
        r"validation split, row 2, field 'image'.*image file not found",
        "missing image file",
    ),
    "path escape": (
        _set("file_name", "../../etc/passwd"),
        r"row 2, .*image path '../../etc/passwd' escapes the data directory",
        "image path outside the data directory",
    ),
    "absolute path": (
        _set("file_name", "/etc/hostname"),
        r"row 2, .*escapes the data directory",
        "image path outside the data directory",
    ),
    "empty text": (_set("caption", "   "), r"row 2, field 'caption': text is empty", "empty text"),
    "missing text": (_set("caption", None), r"row 2: field 'caption' is missing", "missing modality"),
    "unseen label": (
        _set("label", "green"),
        r"row 2, field 'label': label 'green' of task 'label' was not seen in training; known labels: \['blue', 'red'\]",
        "unseen label",
    ),
    "wrong label type": (_set("label", 3.5), r"row 2, field 'label': expected a class label", "wrong field type"),
    "regression not a number": (
        _set("score", "high"),
        r"row 2, field 'score': expected a number for regression task 'score', got 'high'",
        "wrong field type",
    ),
}


def _corrupt(kind):
    def mutate(directory, rows):
        path = directory / rows[2]["file_name"]
        data = path.read_bytes()
        if kind == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif kind == "zero":
            path.write_bytes(b"")
        else:
            path.write_bytes(b"this is not an image at all")

    return mutate


BAD_ROWS.update(
    {
        "truncated image": (
            _corrupt("truncated"),
            r"row 2, field 'image' \(file .*\): (image is corrupt or truncated|not a readable image)",
            None,
        ),
        "zero-byte image": (
            _corrupt("zero"),
            r"row 2, field 'image' \(file .*\): not a readable image",
            "unreadable image",
        ),
        "not an image": (
            _corrupt("text"),
            r"row 2, field 'image' \(file .*\): not a readable image",
            "unreadable image",
        ),
    }
)


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_raises_naming_row_and_field_or_is_counted_when_skipped(tmp_path, case):
    mutate, message, reason = BAD_ROWS[case]
    with pytest.raises(BadInputError, match=message):
        _checked(tmp_path / "raise", mutate)
    kept, report = _checked(tmp_path / "skip", mutate, on_error="skip")
    assert [row["image"] for row in kept] == [f"{i:03d}.png" for i in (0, 1, 3, 4, 5)] and report.total == 1
    if reason:
        assert report.counts[("validation", reason)] == 1
    assert "skipped 1 bad rows" in report.summary()


def test_decompression_bomb_is_refused(tmp_path):
    def huge(directory, rows):
        write_image(directory / rows[2]["file_name"], size=(3000, 3000))

    with pytest.raises(BadInputError, match=r"row 2.*3000x3000 pixels exceeds data.max_image_pixels=1000000"):
        _checked(tmp_path, huge, max_image_pixels=1_000_000)


def test_non_utf8_text(tmp_path):
    make_imagefolder(tmp_path, {"train": make_rows(4)}, metadata="csv")
    path = tmp_path / "train" / "metadata.csv"
    path.write_bytes(path.read_bytes().replace(b"sad picture", b"sad pict\xe9re"))
    config = _config(tmp_path, val_fraction=0.5)
    loaded = load_splits(tmp_path, config)
    processor = FusionProcessor(train_tokenizer(["picture"]))
    tasks = fit_tasks([TaskSpec("label")], loaded.splits["train"], config)
    split = datasets.concatenate_datasets([loaded.splits["train"], loaded.splits["validation"]])
    reader = RowReader(processor, tasks, config, loaded.roots["train"], "train")
    with pytest.raises(BadInputError, match="field 'caption': text contains undecodable bytes"):
        check_split(split, "train", reader, SkipReport(), "raise")
    jsonl = tmp_path / "j" / "train.jsonl"
    jsonl.parent.mkdir()
    write_image(jsonl.parent / "a.png")
    good = b'{"image": "a.png", "caption": "fine", "label": "x"}\n'
    jsonl.write_bytes(good * 3 + b'{"image": "a.png", "caption": "caf\xe9", "label": "x"}\n')
    with pytest.raises(DataError, match=r"train.jsonl, line 4: not valid UTF-8"):
        load_splits(jsonl.parent, _config(jsonl.parent, val_fraction=0.25))


def test_missing_modality_allowed_with_placeholder_policy(tmp_path):
    rows = make_rows(4)
    make_imagefolder(tmp_path, {"train": rows})
    config = _config(tmp_path, missing_modality="placeholder")
    loaded = load_splits(tmp_path, _config(tmp_path))
    tasks = fit_tasks([TaskSpec("label")], loaded.splits["train"], config)
    reader = RowReader(FusionProcessor(train_tokenizer(["picture"])), tasks, config, tmp_path / "train", "train", True)
    item = reader.read({"image": None, "caption": "happy picture", "label": "red"}, 0)
    assert not item["image_present"] and item["text_present"] and torch.all(item["pixel_values"] == 0)
    item = reader.read({"image": rows[0]["file_name"], "caption": None, "label": None}, 1)
    assert item["image_present"] and not item["text_present"] and not item["label_mask"]["label"]
    with pytest.raises(BadInputError, match="both the image and the text are missing"):
        reader.read({"image": None, "caption": None}, 2)


# ----- datasets and collate -----


def test_dataset_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    make_imagefolder(tmp_path)
    for path in (tmp_path / "train").glob("*.png"):  # textured, so that a crop or flip shows in the pixels
        Image.fromarray(np.random.default_rng(int(path.stem)).integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    config = _config(tmp_path)
    loaded = load_splits(tmp_path, config)
    tasks = fit_tasks([TaskSpec("label")], loaded.splits["train"], config)
    reader = RowReader(FusionProcessor(train_tokenizer(["picture"])), tasks, config, loaded.roots["train"], "train")

    def item(index, seed=3, epoch=0, augment=True):
        dataset = FusionDataset(loaded.splits["train"], reader, augment=augment, seed=seed)
        dataset.set_epoch(epoch)
        return dataset[index]["pixel_values"]

    assert torch.equal(item(5, epoch=1), item(5, epoch=1))  # the same (seed, epoch, index): the same pixels
    assert not torch.equal(item(5, epoch=0), item(5, epoch=1))  # a new epoch, a new crop
    assert not torch.equal(item(5, seed=3), item(5, seed=4))  # a new seed, a new crop
    plain = item(5, augment=False)
    assert not torch.equal(item(5), plain)
    assert torch.equal(plain, item(5, seed=4, epoch=2, augment=False))  # no augmentation: no randomness at all
    assert item(5).shape == plain.shape == (3, 64, 64)


def test_collate_pads_to_the_longest_text_and_stacks_label_masks():
    rows = [
        {
            "row": 0,
            "pixel_values": torch.zeros(3, 4, 4),
            "input_ids": [5, 6, 7],
            "image_present": True,
            "text_present": True,
            "labels": {"t": torch.tensor(1)},
            "label_mask": {"t": True},
        },
        {
            "row": 7,
            "pixel_values": torch.ones(3, 4, 4),
            "input_ids": [9],
            "image_present": False,
            "text_present": True,
            "labels": {"t": torch.tensor(-1)},
            "label_mask": {"t": False},
        },
    ]
    batch = Collator(pad_id=2)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["label_mask"]["t"].tolist() == [True, False] and batch["labels"]["t"].tolist() == [1, -1]
    assert batch["image_present"].tolist() == [True, False] and batch["row"].tolist() == [0, 7]
    assert torch.equal(batch["pixel_values"][1], torch.ones(3, 4, 4))
