"""Finding and loading the splits of a dataset with Hugging Face `datasets`, and the tasks its columns hold.

Accepted: a directory in any layout `datasets` recognises (data_files.py finds the files of each split: imagefolder
with `{split}/metadata.jsonl|csv` and `file_name`, `{split}.csv|jsonl|parquet`, the Hub's `data/{split}-0000x-of-0000N`
parquet shards, WebDataset .tar shards), a single CSV / JSON Lines / parquet file, a `save_to_disk` directory, a Hub
dataset id in the local cache, a `datasets.Dataset` / `DatasetDict`, or a pandas DataFrame / dict of DataFrames per
split. Images may be paths relative to the data file, bytes (the Image feature's `{bytes, path}`), or decoded images.
Rows are checked and read in rows.py; prepare.py puts the two together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from .config import DataConfig, TaskSpec
from .data_files import SPLIT_ALIASES, find_split_files, is_saved_dataset, resolve_source
from .errors import DataError
from .frames import frames_kind, to_datasets
from .processing import as_number

if TYPE_CHECKING:
    import pandas

ROW_COLUMN = "__row__"  # a row's number in its split before bad rows were skipped


@dataclass
class LoadedData:
    """Raw splits plus, for each, the directory that relative image paths start from."""

    splits: dict[str, Dataset | IterableDataset]
    roots: dict[str, Path | None]
    source: str
    held_out: bool = False  # validation was held out of train (its rows keep their numbers in the train data)

    @property
    def streaming(self) -> bool:
        return any(isinstance(split, IterableDataset) for split in self.splits.values())


# ----- loading -----


def load_splits(
    source: str | os.PathLike | Dataset | DatasetDict | pandas.DataFrame | dict[str, pandas.DataFrame],
    config: DataConfig,
    for_training: bool = True,
) -> LoadedData:
    """Read the splits of `source`. For training there must be a train split, and without a validation split
    `val_fraction` of train is held out (seeded); for evaluation the splits are taken as they are.
    A pandas DataFrame is the train split, a dict of DataFrames names its splits (see `frames.to_datasets`)."""
    name = frames_kind(source)
    source = to_datasets(source, config.image_column)
    if isinstance(source, (Dataset, DatasetDict, IterableDataset, IterableDatasetDict)):
        splits = dict(source) if isinstance(source, (DatasetDict, IterableDatasetDict)) else {"train": source}
        root = Path(config.image_root) if config.image_root else None  # built in Python: paths as the user gave
        loaded = LoadedData(splits, dict.fromkeys(splits, root), source=name or type(source).__name__)
    else:
        loaded = _load_path(resolve_source(str(source)), config)
    loaded.splits = {
        SPLIT_ALIASES.get(name, name): _without_image_decoding(split, config.image_column)
        for name, split in loaded.splits.items()
    }
    loaded.roots = {SPLIT_ALIASES.get(name, name): root for name, root in loaded.roots.items()}
    if for_training and "train" not in loaded.splits:
        raise DataError(f"{loaded.source}: no train split; found splits {sorted(loaded.splits)}")
    if for_training and "validation" not in loaded.splits:
        _hold_out_validation(loaded, config)
    for name, split in loaded.splits.items():
        if not isinstance(split, IterableDataset) and len(split) == 0:
            raise DataError(f"{loaded.source}: the {name} split is empty")
    return loaded


def _load_path(path: Path, config: DataConfig) -> LoadedData:
    if config.format == "disk" or (config.format == "auto" and is_saved_dataset(path)):
        data = datasets.load_from_disk(str(path))
        splits = dict(data) if isinstance(data, DatasetDict) else {"train": data}
        if config.streaming:
            splits = {name: split.to_iterable_dataset() for name, split in splits.items()}
        return LoadedData(splits, dict.fromkeys(splits, Path(config.image_root or path)), str(path))
    found = find_split_files(path, config.format)
    for name, files in found.files.items():
        for file in files:
            if file.stat().st_size == 0:
                raise DataError(f"{path}: the {name} split is empty ({file} has no rows)")
            if found.builder == "json":
                _check_utf8_lines(file)
    # CSV: bad bytes fail per row, named; only an empty cell is a missing value ("nan" stays a value to check).
    csv = {"encoding_errors": "replace", "keep_default_na": False, "na_values": [""]}
    options = csv if found.builder == "csv" else {}
    splits = {}
    for name, files in found.files.items():  # one by one: each split may infer its own column types
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} {found.builder} files)"
        try:
            split = datasets.load_dataset(
                found.builder,
                data_files={name: [str(file) for file in files]},
                split=name,
                streaming=config.streaming,
                **options,
            )
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not valid UTF-8 ({error})") from None
        except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
            cause = error.__cause__ or error.__context__ or error
            raise DataError(f"{where}: could not be read as {found.builder}: {cause}") from None
        if found.imagefolder:  # as `datasets` reads imagefolder metadata: file_name is the image, X_file_name X's file
            columns = split.column_names or []
            names = {c: c.removesuffix("_file_name") for c in columns if c.endswith("_file_name") and c != "_file_name"}
            if "file_name" in columns:
                names["file_name"] = config.image_column
            split = split.rename_columns(names) if names else split
        splits[name] = _lift_json_fields(split) if found.builder == "webdataset" else split
    roots = dict.fromkeys(found.roots, Path(config.image_root)) if config.image_root else found.roots
    return LoadedData(splits, roots, str(path))


def _lift_json_fields(split: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """WebDataset samples keep their labels in a `.json` file: its fields become columns."""
    fields = (split.features or {}).get("json")
    if not isinstance(fields, dict):
        return split
    others = {name: feature for name, feature in split.features.items() if name != "json"}
    features = datasets.Features({**others, **fields})

    def lift(row):
        values = row["json"] or {}
        return {name: values.get(name) for name in fields}

    return split.map(lift, remove_columns=["json"], features=features)


def _check_utf8_lines(file: Path) -> None:
    """JSON must be UTF-8 (pyarrow would otherwise fail later, deep inside, without a row number)."""
    with file.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{file}, line {number}: not valid UTF-8 ({error.reason} at byte {error.start})"
                ) from None


def _hold_out_validation(loaded: LoadedData, config: DataConfig) -> None:
    """A deterministic validation split: a seeded shuffle of a table; for a stream, the rows whose seeded hash of
    their image and text falls under val_fraction (by content, so shuffled shards keep every row on its side)."""
    train = loaded.splits["train"]
    if isinstance(train, IterableDataset):
        threshold = int(config.val_fraction * 10_000)

        def is_validation(row):
            return _content_bucket(row, config) < threshold

        loaded.splits["validation"] = train.filter(is_validation)
        loaded.splits["train"] = train.filter(lambda row: not is_validation(row))
    else:
        if len(train) < 2:
            raise DataError(f"{loaded.source}: {len(train)} training row(s) cannot be split into train and validation")
        train = train.add_column(ROW_COLUMN, list(range(len(train))))  # messages name the row in the file
        parts = train.train_test_split(test_size=config.val_fraction, seed=config.split_seed, shuffle=True)
        loaded.splits["train"], loaded.splits["validation"] = parts["train"], parts["test"]
    loaded.roots["validation"] = loaded.roots["train"]
    loaded.held_out = True


def _content_bucket(row: dict, config: DataConfig) -> int:
    """0..9999 from a seeded hash of the row's image (bytes or path) and text."""
    digest = hashlib.sha256(str(config.split_seed).encode())
    for column in (config.image_column, config.text_column):
        value = row.get(column)
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        digest.update(value if isinstance(value, bytes) else repr(value).encode())
        digest.update(b"\0")
    return int.from_bytes(digest.digest()[:8], "big") % 10_000


def _without_image_decoding(split: Dataset | IterableDataset, image_column: str):
    """Keep images as bytes/paths so that decoding happens in our checks, with our error messages."""
    features = split.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return split.cast_column(image_column, datasets.Image(decode=False))
    return split


# ----- tasks and label maps -----


def infer_tasks(train: Dataset | IterableDataset, config: DataConfig) -> tuple[list[TaskSpec], list[str]]:
    """Tasks from the training split's column types, and one line of explanation per column."""
    features = train.features
    if features is None:
        raise DataError("cannot infer tasks from a stream without known features; list them under `tasks`")
    ignored = {config.image_column, config.text_column, "file_name"}
    tasks, notes = [], []
    for name, feature in features.items():
        if name in ignored or name.startswith("_"):
            continue
        kind = _task_type(feature)
        if kind is None and isinstance(feature, datasets.Json):  # mixed value types: go by the majority
            kind = _majority_task_type(train, name)
            feature = "mixed types"
        elif kind == "classification" and _mostly_decimal_strings(train, feature, name):  # CSV numbers as text
            kind = "regression"
            feature = "decimal numbers as text"
        if kind is None:
            notes.append(f"column {name!r} ({feature}) ignored: not a label type")
            continue
        if kind == "classification" and _holds_files(train, feature, name):
            notes.append(
                f"column {name!r} (file paths) ignored: for masks, declare a segmentation or dense_regression task"
            )
            continue
        distinct = _distinct_strings(train, feature, name) if kind == "classification" else 0
        if distinct > MAX_INFERRED_CLASSES:
            notes.append(
                f"column {name!r} (text, {distinct} distinct values) ignored: free text rather "
                "than labels; declare a classification task to train on it"
            )
            continue
        tasks.append(TaskSpec(name=name, type=kind))
        notes.append(f"column {name!r} ({_describe(feature)}) -> {kind} task")
    if not tasks:
        raise DataError(f"no label columns to infer tasks from; columns are {list(features)}")
    return tasks, notes


def _majority_task_type(train: Dataset | IterableDataset, column: str) -> str | None:
    """The task type most values of a mixed-type column suggest (rows of another type then fail their checks)."""
    kinds = Counter()
    for value in _column_values(train, [column], limit=10_000)[column]:
        if isinstance(value, list):
            kinds["multilabel"] += 1
        elif isinstance(value, float):
            kinds["regression"] += 1
        elif isinstance(value, (str, int, bool)):
            kinds["classification"] += 1
    return kinds.most_common(1)[0][0] if kinds else None


def _mostly_decimal_strings(train: Dataset | IterableDataset, feature: Any, column: str) -> bool:
    """A text column whose values are nearly all decimal numbers (a CSV column with one bad cell, say)."""
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        return False
    values = [v for v in _column_values(train, [column], limit=10_000)[column] if v is not None]
    numbers = [v for v in values if as_number(v) is not None]
    return bool(values) and len(numbers) >= 0.9 * len(values) and any("." in v for v in numbers)


FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy")


MAX_INFERRED_CLASSES = 100
"""A text column with more distinct values than this, each seen fewer than 20 times on average, is free text (a
second caption, a referral), not labels: task inference leaves it out."""


def _distinct_strings(train: Dataset | IterableDataset, feature: Any, column: str) -> int:
    """Distinct values of a text column (a stream: in its first 10,000 rows), when they average fewer than 20 rows
    each; else 0."""
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        return 0
    values = _column_values(train, [column], limit=10_000)[column]
    distinct = len(set(values))
    return distinct if distinct * 20 > len(values) else 0


def _holds_files(train: Dataset | IterableDataset, feature: Any, column: str) -> bool:
    """A text column whose values are all file names (masks, images): not class labels."""
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        return False
    values = [v for v in _column_values(train, [column], limit=1000)[column] if v is not None]
    return bool(values) and all(str(v).lower().endswith(FILE_SUFFIXES) for v in values)


def _describe(feature: Any) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def _task_type(feature: Any) -> str | None:
    if isinstance(feature, datasets.Value):
        if feature.dtype in ("string", "large_string", "bool") or feature.dtype.startswith(("int", "uint")):
            return "classification"
        if feature.dtype.startswith("float"):
            return "regression"
    if isinstance(feature, (datasets.Sequence, datasets.List, datasets.LargeList, list)):
        return "multilabel"
    if isinstance(feature, datasets.ClassLabel):
        return "classification"
    return None


def fit_tasks(tasks: list[TaskSpec], train: Dataset | IterableDataset, config: DataConfig) -> list[TaskSpec]:
    """Label maps and regression statistics from the training split (values of the wrong type are left to checks)."""
    read = [t.column for t in tasks if not t.is_dense and (t.type != "matching" or t.column in _names(train))]
    columns = _column_values(train, read)
    fitted = []
    for spec in tasks:
        if spec.type == "segmentation" and spec.num_labels is None:
            raise DataError(f"segmentation task {spec.name!r} needs num_labels (or labels): its masks hold class ids")
        if spec.type == "matching" or spec.is_dense:  # dense_regression statistics: prepare.fit_dense_statistics
            fitted.append(spec)
            continue
        values = [v for v in columns[spec.column] if v is not None]
        if spec.type == "regression":
            numbers = np.array([n for n in map(as_number, values) if n is not None and math.isfinite(n)])
            if len(numbers) == 0:
                raise DataError(f"regression task {spec.name!r}: column {spec.column!r} has no numeric values in train")
            std = float(numbers.std()) or 1.0
            fitted.append(_replace(spec, target_mean=float(numbers.mean()), target_std=std))
            continue
        if spec.labels is None:
            items = [item for v in values for item in v] if spec.type == "multilabel" else values
            labels = _sorted_labels(item for item in items if isinstance(item, (str, int, bool)))
            if not labels:
                raise DataError(f"task {spec.name!r}: column {spec.column!r} has no labels in the train split")
            spec = _replace(spec, labels=labels, num_labels=len(labels))
        fitted.append(spec)
    return fitted


def label_counts(tasks: list[TaskSpec], train: Dataset | IterableDataset) -> dict[str, list[int]]:
    """Rows of each class of every classification task in the training split (a stream: its first 100,000 rows),
    in label-map order; rows without a label are not counted."""
    specs = [spec for spec in tasks if spec.type == "classification"]
    columns = _column_values(train, [spec.column for spec in specs])
    counts = {}
    for spec in specs:
        index = {name: i for i, name in enumerate(spec.labels or [])}
        tally = [0] * len(index)
        for value in columns[spec.column]:
            if value is not None and str(value) in index:
                tally[index[str(value)]] += 1
        counts[spec.name] = tally
    return counts


def _replace(spec: TaskSpec, **changes) -> TaskSpec:
    return dataclasses.replace(spec, **changes)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sorted_labels(values) -> list[str]:
    unique = set(values)
    if all(_is_number(v) for v in unique):
        return [str(v) for v in sorted(unique)]
    return sorted(str(v) for v in unique)


def _names(split: Dataset | IterableDataset) -> list[str]:
    return list(split.column_names or (split.features or {}).keys())


def _column_values(split: Dataset | IterableDataset, columns: list[str], limit: int = 100_000) -> dict[str, list]:
    """The values of `columns` (a stream is read up to `limit` rows), naming a missing column."""
    available = _names(split)
    for column in columns:
        if column not in available:
            raise DataError(f"column {column!r} not found; the data has columns {available}")
    if isinstance(split, Dataset):
        return {column: split[column] for column in columns}
    values: dict[str, list] = {column: [] for column in columns}
    for row in split.take(limit):
        for column in columns:
            values[column].append(row[column])
    return values


def check_columns(split: Dataset | IterableDataset, split_name: str, tasks: list[TaskSpec], config: DataConfig):
    """Every configured column exists (a missing task column is more likely a typo than a task without labels)."""
    available = _names(split)
    for field_name, column in (("data.image_column", config.image_column), ("data.text_column", config.text_column)):
        if column not in available:
            raise DataError(f"{split_name} split: {field_name} {column!r} not found; the data has columns {available}")
    for spec in tasks:
        if spec.column not in available and not (spec.type == "matching" and spec.column == spec.name):
            raise DataError(
                f"{split_name} split: column {spec.column!r} of task {spec.name!r} not found; "
                f"the data has columns {available}"
            )
