"""Data where users keep it: a Hub dataset repository (parquet shards with the Image feature), a Hub dataset id in
the offline cache, WebDataset tar shards, and the other layouts `datasets`' data-files patterns recognise."""

from __future__ import annotations

import json

import datasets
import pytest
from helpers import make_hub_repo, make_imagefolder, make_rows, make_webdataset
from test_predictor import go_offline

from mmfusion.config import DataConfig, TaskSpec
from mmfusion.data import fit_tasks, infer_tasks, load_splits
from mmfusion.errors import DataError
from mmfusion.processing import FusionProcessor, train_tokenizer
from mmfusion.rows import RowReader


def _config(path, **overrides) -> DataConfig:
    return DataConfig(path=str(path), **overrides)


def _read(loaded, config, split="train", count=2) -> list[dict]:
    """The first rows of a split, read as training reads them."""
    tasks = fit_tasks([TaskSpec("label")], loaded.splits["train"], config)
    reader = RowReader(FusionProcessor(train_tokenizer(["picture"])), tasks, config, loaded.roots[split], split)
    rows = list(loaded.splits[split].take(count)) if loaded.streaming else list(loaded.splits[split])[:count]
    return [reader.read(row, index) for index, row in enumerate(rows)]


def _is_blue(item: dict) -> bool:
    return item["pixel_values"][2].mean() > 1.0 > item["pixel_values"][0].mean()


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_repository_with_parquet_shards_and_its_data_folder(tmp_path, streaming):
    make_hub_repo(tmp_path / "repo", shards=2)
    assert sorted(p.name for p in (tmp_path / "repo" / "data").iterdir()) == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
        "validation-00000-of-00002.parquet",
        "validation-00001-of-00002.parquet",
    ]
    for path in (tmp_path / "repo", tmp_path / "repo" / "data"):
        config = _config(path, streaming=streaming)
        loaded = load_splits(path, config)
        assert sorted(loaded.splits) == ["train", "validation"]
        assert loaded.splits["train"].features["image"] == datasets.Image(decode=False)
        if streaming:
            assert loaded.splits["train"].n_shards == 2 and len(list(loaded.splits["train"])) == 12
        else:
            assert len(loaded.splits["train"]) == 12 and len(loaded.splits["validation"]) == 6
        first, second = _read(loaded, config)
        assert _is_blue(first) and not _is_blue(second)  # rows 0 and 1: blue, then red


def test_hub_dataset_id_is_read_from_the_offline_cache(tmp_path, monkeypatch):
    hub = go_offline(monkeypatch, tmp_path / "hf")
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = hub / "datasets--someone--tiny"
    make_hub_repo(repo / "snapshots" / commit, shards=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    config = _config("someone/tiny")
    loaded = load_splits("someone/tiny", config)
    assert {name: len(split) for name, split in loaded.splits.items()} == {"train": 12, "validation": 6}
    assert _is_blue(_read(loaded, config)[0])
    with pytest.raises(DataError, match="someone/other is neither a local path nor a Hugging Face Hub dataset"):
        load_splits("someone/other", _config("someone/other"))
    with pytest.raises(DataError, match="data.path does not exist: some/where/else"):
        load_splits("some/where/else", _config("some/where/else"))  # a path, never a Hub id


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_tar_shards_with_labels_in_json(tmp_path, streaming):
    make_webdataset(tmp_path, shards=2)
    config = _config(tmp_path, image_column="png", text_column="txt", streaming=streaming)
    loaded = load_splits(tmp_path, config)
    assert sorted(loaded.splits) == ["train", "validation"]
    if streaming:
        assert loaded.splits["train"].n_shards == 2
    tasks, _ = infer_tasks(loaded.splits["train"], config)
    assert {t.name: t.type for t in tasks} == {"label": "classification", "score": "regression", "tags": "multilabel"}
    items = _read(loaded, config, count=12)
    rows = list(loaded.splits["train"])
    assert [_is_blue(item) for item in items] == [row["label"] == "blue" for row in rows]
    assert items[0]["labels"]["label"].item() == ["blue", "red"].index(rows[0]["label"])


def test_other_layouts_datasets_recognises(tmp_path):
    """Sharded split files (train_0.csv, train_1.csv) and split directories of data files."""
    rows = [{k: v for k, v in row.items() if not k.startswith("_") and k != "tags"} for row in make_rows(10)]
    make_imagefolder(tmp_path / "images", {"all": make_rows(10)})
    (tmp_path / "images" / "all" / "metadata.jsonl").unlink()
    for row in rows:
        row["file_name"] = f"images/all/{row['file_name']}"
    table = datasets.Dataset.from_list(rows)
    table.select(range(6)).to_csv(tmp_path / "train_0.csv", index=False)
    table.select(range(6, 10)).to_csv(tmp_path / "train_1.csv", index=False)
    table.select(range(3)).to_csv(tmp_path / "test_0.csv", index=False)
    loaded = load_splits(tmp_path, _config(tmp_path, image_column="file_name", val_fraction=0.2))
    assert {name: len(split) for name, split in loaded.splits.items()} == {"train": 8, "validation": 2, "test": 3}

    nested = tmp_path / "nested"
    for split, count in (("train", 5), ("validation", 2)):
        (nested / "data" / split).mkdir(parents=True)
        for shard in range(2):
            lines = [json.dumps(r) for r in rows[shard * count : (shard + 1) * count]]
            (nested / "data" / split / f"shard_{shard}.jsonl").write_text("\n".join(lines) + "\n")
    loaded = load_splits(nested, _config(nested))
    assert {name: len(split) for name, split in loaded.splits.items()} == {"train": 10, "validation": 4}


def test_errors_name_what_was_found(tmp_path):
    make_imagefolder(tmp_path / "two", {"train": make_rows(4)})
    (tmp_path / "two" / "train" / "more").mkdir()
    (tmp_path / "two" / "train" / "more" / "metadata.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"the train split has several metadata files \['train/metadata.jsonl'"):
        load_splits(tmp_path / "two", _config(tmp_path / "two"))
    (tmp_path / "mixed").mkdir()
    datasets.Dataset.from_list([{"caption": "a"}]).to_csv(tmp_path / "mixed" / "train.csv")
    datasets.Dataset.from_list([{"caption": "a"}]).to_json(tmp_path / "mixed" / "test.jsonl")
    with pytest.raises(DataError, match=r"splits are stored in different formats \['.csv', '.jsonl'\]"):
        load_splits(tmp_path / "mixed", _config(tmp_path / "mixed"))
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="no data found; expected"):
        load_splits(tmp_path / "pictures", _config(tmp_path / "pictures"))
