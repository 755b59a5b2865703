"""Which files hold which split: a single file, a directory in any layout `datasets` recognises (its own data-files
patterns decide: `{split}.csv`, `{split}/metadata.jsonl`, `data/{split}-0000x-of-0000N.parquet`, `train_0.csv`, ...),
a local copy of a Hub dataset repository, or a Hub dataset id (`owner/name`) read from the Hugging Face cache.
data.py loads what is found here.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

from .errors import DataError
from .hub import snapshot

TABLE_FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".tar": "webdataset"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "validation"}
NO_DATA = (
    "no data found; expected {split}/metadata.jsonl (imagefolder), {split}.csv|jsonl|parquet files, "
    "data/{split}-00000-of-0000N.parquet shards, WebDataset .tar shards, a save_to_disk directory, "
    "or a single data file"
)


@dataclass
class SplitFiles:
    """The data files of each split, the builder that reads them (csv, json, parquet, webdataset), and the directory
    that relative image paths start from. In imagefolder layout the files are metadata files beside the images."""

    builder: str
    files: dict[str, list[Path]]
    roots: dict[str, Path]
    imagefolder: bool = False


def resolve_source(source: str) -> Path:
    """A local path as is; otherwise the snapshot of the Hub dataset `owner/name` in the Hugging Face cache (offline
    with HF_HUB_OFFLINE=1: the cache alone)."""
    path = Path(source)
    if path.exists():
        return path
    if path.is_absolute() or source.startswith(".") or source.count("/") != 1:
        raise DataError(f"data.path does not exist: {path}")  # a path, not an owner/name id
    try:
        return snapshot(source, "dataset")
    except LookupError as error:
        raise DataError(
            f"data.path does not exist: {source} is neither a local path nor a Hugging Face Hub dataset in the cache "
            f"{error}"
        ) from None


def _files_by_split(path: Path) -> dict[str, list[Path]]:
    """`datasets`' data-files patterns applied to the data files under `path`. The patterns see a stand-in tree of
    empty files with the same names, the images left out: globbing every image of a large folder takes minutes."""
    candidates = [
        Path(directory, name).relative_to(path)
        for directory, _, names in os.walk(path)
        for name in names
        if Path(name).suffix in TABLE_FORMATS
    ]
    with tempfile.TemporaryDirectory() as stand_in:
        for relative in candidates:
            twin = Path(stand_in, relative)
            twin.parent.mkdir(parents=True, exist_ok=True)
            twin.touch()
        try:
            found = DataFilesDict.from_patterns(get_data_patterns(stand_in), base_path=stand_in)
        except (EmptyDatasetError, FileNotFoundError):
            return {}
        base = os.path.realpath(stand_in)
        return {
            str(name): sorted(path / os.path.relpath(os.path.realpath(file), base) for file in names)
            for name, names in found.items()
        }


def is_saved_dataset(path: Path) -> bool:
    """A `save_to_disk` directory."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def find_split_files(path: Path, fmt: str = "auto") -> SplitFiles:
    """The files of each split under `path`, found by `datasets`' data-files patterns; `fmt` (a DataConfig.format)
    restricts them to one format."""
    if path.is_file():
        if path.suffix not in TABLE_FORMATS:
            raise DataError(f"{path}: unknown data file type {path.suffix!r}; expected one of {sorted(TABLE_FORMATS)}")
        return SplitFiles(TABLE_FORMATS[path.suffix], {"train": [path]}, {"train": path.parent})
    files = {SPLIT_ALIASES.get(name, name): names for name, names in _files_by_split(path).items()}
    metadata = {name: [f for f in names if f.name in METADATA_FILES] for name, names in files.items()}
    imagefolder = fmt == "imagefolder" or (fmt == "auto" and any(metadata.values()))
    if imagefolder:
        files = {name: names for name, names in metadata.items() if names}
        for name, names in files.items():
            if len(names) > 1:
                listed = [str(f.relative_to(path)) for f in names]
                raise DataError(f"{path}: the {name} split has several metadata files {listed}; keep one per split")
    else:
        wanted = {suffix for suffix, builder in TABLE_FORMATS.items() if fmt in ("auto", builder)}
        files = {name: kept for name, names in files.items() if (kept := [f for f in names if f.suffix in wanted])}
    if not files:
        raise DataError(f"{path}: {NO_DATA}")
    suffixes = {f.suffix for names in files.values() for f in names}
    builders = {TABLE_FORMATS[suffix] for suffix in suffixes}
    if len(builders) > 1:
        raise DataError(f"{path}: splits are stored in different formats {sorted(suffixes)}; use one")
    roots = {name: Path(os.path.commonpath([f.parent for f in names])) for name, names in files.items()}
    return SplitFiles(builders.pop(), files, roots, imagefolder)
