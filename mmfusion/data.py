"""Finding and loading the splits of a dataset with Hugging Face `datasets`, and the tasks its columns hold.

Accepted: a directory in imagefolder layout (`{split}/metadata.jsonl|csv` with `file_name`), a directory of
`{split}.csv|jsonl|parquet` files, a single CSV / JSON Lines / parquet file, a `save_to_disk` directory, a
`datasets.Dataset` / `DatasetDict`, or a pandas DataFrame / dict of DataFrames per split. Images may be paths
relative to the data file, bytes, or decoded images.
Rows are checked and read in rows.py; prepare.py puts the two together.
"""

from __future__ import annotations

import dataclasses
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
from .errors import DataError
from .frames import frames_kind, to_datasets
from .processing import as_number

if TYPE_CHECKING:
    import pandas

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}
TABLE_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
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
        loaded = _load_path(Path(source), config)
    loaded.splits = {SPLIT_ALIASES.get(name, name): split for name, split in loaded.splits.items()}
    loaded.roots = {SPLIT_ALIASES.get(name, name): root for name, root in loaded.roots.items()}
    if for_training and "train" not in loaded.splits:
        raise DataError(f"{loaded.source}: no train split; found splits {sorted(loaded.splits)}")
    if for_training and "validation" not in loaded.splits:
        _hold_out_validation(loaded, config)
    for name, split in loaded.splits.items():
        loaded.splits[name] = _without_image_decoding(split, config.image_column)
        if not isinstance(split, IterableDataset) and len(split) == 0:
            raise DataError(f"{loaded.source}: the {name} split is empty")
    return loaded


def _load_path(path: Path, config: DataConfig) -> LoadedData:
    if not path.exists():
        raise DataError(f"data.path does not exist: {path}")
    fmt = config.format
    if fmt == "auto":
        fmt = _detect_format(path)
    streaming = config.streaming
    if fmt == "disk":
        data = datasets.load_from_disk(str(path))
        splits = dict(data) if isinstance(data, DatasetDict) else {"train": data}
        if streaming:
            splits = {name: split.to_iterable_dataset() for name, split in splits.items()}
        return LoadedData(splits, dict.fromkeys(splits, Path(config.image_root or path)), str(path))
    files, roots = _split_files(path, fmt)
    suffixes = {file.suffix for file in files.values()}
    if len(suffixes) > 1:
        raise DataError(f"{path}: splits are stored in different formats {sorted(suffixes)}; use one")
    builder = TABLE_FORMATS[suffixes.pop()]
    for name, file in files.items():
        if file.stat().st_size == 0:
            raise DataError(f"{path}: the {name} split is empty ({file} has no rows)")
        if builder == "json":
            _check_utf8_lines(file)
    # CSV: bad bytes fail per row, named; only an empty cell is a missing value ("nan" stays a value to check).
    options = {"encoding_errors": "replace", "keep_default_na": False, "na_values": [""]} if builder == "csv" else {}
    data = {}
    for name, file in files.items():  # one by one: each split may infer its own column types
        try:
            data[name] = datasets.load_dataset(
                builder, data_files={name: str(file)}, split=name, streaming=streaming, **options
            )
        except UnicodeDecodeError as error:
            raise DataError(f"{file}: not valid UTF-8 ({error})") from None
        except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
            cause = error.__cause__ or error.__context__ or error
            raise DataError(f"{file}: could not be read as {builder}: {cause}") from None
    if config.image_root:
        roots = dict.fromkeys(roots, Path(config.image_root))
    image_column = "file_name" if fmt == "imagefolder" else None
    splits = {}
    for name, split in data.items():
        if image_column and image_column in (split.column_names or []):
            split = split.rename_column(image_column, config.image_column)
        splits[name] = split
    return LoadedData(splits, roots, str(path))


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


def _detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix not in TABLE_FORMATS:
            raise DataError(f"{path}: unknown data file type {path.suffix!r}; expected one of {sorted(TABLE_FORMATS)}")
        return TABLE_FORMATS[path.suffix]
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "disk"
    if any((path / name).is_file() for name in METADATA_FILES) or any(
        (child / name).is_file() for child in path.iterdir() if child.is_dir() for name in METADATA_FILES
    ):
        return "imagefolder"
    if any(child.suffix in TABLE_FORMATS for child in path.iterdir()):
        return "table"
    raise DataError(
        f"{path}: no data found; expected {{split}}/metadata.jsonl (imagefolder), {{split}}.csv|jsonl|parquet files, "
        "a save_to_disk directory, or a single data file"
    )


def _split_files(path: Path, fmt: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """Data file and image root of each split."""
    if path.is_file():
        return {"train": path}, {"train": path.parent}
    files: dict[str, Path] = {}
    if fmt == "imagefolder":
        for directory in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
            metadata = next((directory / n for n in METADATA_FILES if (directory / n).is_file()), None)
            if metadata is not None:
                files["train" if directory == path else directory.name] = metadata
    else:
        files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix in TABLE_FORMATS}
        unknown = sorted(set(files) - set(SPLITS) - set(SPLIT_ALIASES))
        if unknown:
            raise DataError(f"{path}: files {unknown} are not named after a split ({list(SPLITS)})")
    if not files:
        raise DataError(f"{path}: no metadata or data files found")
    return files, {name: file.parent for name, file in files.items()}


def _hold_out_validation(loaded: LoadedData, config: DataConfig) -> None:
    """A deterministic validation split: rows whose seeded hash of the index falls under val_fraction."""
    train = loaded.splits["train"]
    if isinstance(train, IterableDataset):
        threshold = int(config.val_fraction * 10_000)

        def is_validation(_row, index):
            return _index_bucket(index, config.split_seed) < threshold

        loaded.splits["validation"] = train.filter(is_validation, with_indices=True)
        loaded.splits["train"] = train.filter(lambda row, index: not is_validation(row, index), with_indices=True)
    else:
        if len(train) < 2:
            raise DataError(f"{loaded.source}: {len(train)} training row(s) cannot be split into train and validation")
        train = train.add_column(ROW_COLUMN, list(range(len(train))))  # messages name the row in the file
        parts = train.train_test_split(test_size=config.val_fraction, seed=config.split_seed, shuffle=True)
        loaded.splits["train"], loaded.splits["validation"] = parts["train"], parts["test"]
    loaded.roots["validation"] = loaded.roots["train"]
    loaded.held_out = True


def _index_bucket(index: int, seed: int) -> int:
    return int(np.random.default_rng([seed, index]).integers(0, 10_000))


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
    columns = _column_values(train, [t.column for t in tasks if t.type != "matching" or t.column in _names(train)])
    fitted = []
    for spec in tasks:
        if spec.type == "matching":
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
