"""The decoded-image cache (`--data.cache DIR|auto`): every image of a split decoded and resized once, stored as
uint8 in a memory-mapped file, so later epochs and runs read arrays instead of decoding files.

What is stored: for evaluation (no augmentation) each image resized exactly as the uncached path resizes it
(`FusionProcessor.resize`), so the pixels are the same bit for bit; for training the whole image, each side shrunk
to at most `FusionProcessor.cache_side` (enough that the smallest random crop is never enlarged) and never enlarged,
and the original size; the crop and flip (the same boxes, drawn from (seed, epoch, index)) are cut from the uint8
array and resized as the uncached path resizes a crop. An image that fits is stored as it is, so its training crops
are the uncached path's pixels too. A row whose image is bad keeps its error message, so the row checks need not decode
again.

An entry is keyed by the split's `datasets` fingerprint (its data files, their modification times, and every
transform since), the split's name and row numbering, the image column, root and size limit, and the image
settings (size, resize, interpolation, center crop, and whether it serves training crops);
the files that rows name by path are checked by size and modification time whenever the entry is opened. A change
to any of them builds a new entry. Entries are built under a file lock and renamed into place when complete, so
processes (and machines sharing the directory) build each entry once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset
from filelock import FileLock

from .data import ROW_COLUMN
from .device_decode import DEVICE
from .errors import BadInputError
from .files import atomic_directory
from .processing import path_of

AUTO_DISK_SHARE = 0.8  # `auto` stores the images when they take less than this share of the free disk space
AUTO_DEVICE_MIN_SIZE = 128  # `auto` decodes on the GPU, when the images are not stored, from this input size
CACHE_FORMAT = 2  # 2: training images stored at their own size when they fit
IMAGES_NAME, PRESENT_NAME, SIZES_NAME, INDEX_NAME = "images.u8", "present.npy", "sizes.npy", "index.json"
READ_BATCH = 256


def cache_root(option: str) -> Path:
    """`--data.cache`: a directory, or `auto` for mmfusion_images/ in the datasets cache (HF_DATASETS_CACHE)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "mmfusion_images" if option == "auto" else Path(option)


@dataclass
class ImageCache:
    """One split's images, indexed by row position in the split (or, after `select`, in the checked rows)."""

    directory: Path
    side: int
    count: int
    errors: dict[int, str]  # position -> the row's image error
    present: np.ndarray  # position -> has an image
    sizes: np.ndarray  # position -> the original image's (width, height)
    positions: np.ndarray | None = None  # dataset index -> position (after `select`)
    _array: np.memmap | None = field(default=None, repr=False)

    @property
    def array(self) -> np.memmap:
        if self._array is None:  # opened lazily: in each loader worker, never pickled
            shape = (self.count, self.side, self.side, 3)
            self._array = np.memmap(self.directory / IMAGES_NAME, dtype=np.uint8, mode="r", shape=shape)
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def image(self, index: int) -> tuple[np.ndarray | None, tuple[int, int] | None]:
        """The stored H x W x 3 uint8 image of row `index` and the original's (width, height); Nones for a row
        without an image."""
        position = int(self.positions[index]) if self.positions is not None else index
        if not self.present[position]:
            return None, None
        width, height = self.sizes[position]
        return self.array[position], (int(width), int(height))

    def select(self, keep: list[int]) -> ImageCache:
        """The cache as indexed by the kept rows."""
        kept = np.asarray(keep)
        return ImageCache(self.directory, self.side, self.count, self.errors, self.present, self.sizes, kept)


def resolve_auto(option: str | None, rows: dict[str, int], processor, cuda: bool) -> tuple[dict, str]:
    """Per split, what `--data.cache` means: a directory to store its images in, "device", or None (decode on the
    host); with a note saying what `auto` chose. `auto` stores the images (the fastest way: benchmarks/pipeline.py)
    when they fit in the free space of the datasets cache's disk; when they do not, training JPEGs are decoded on
    the GPU when there is one and the model's input is at least 128 px (there device decoding beat host decoding;
    on a 64 px model it did not), and everything else decodes on the host."""
    if option != "auto":
        return dict.fromkeys(rows, option), ""
    root = cache_root(option)
    root.mkdir(parents=True, exist_ok=True)
    needed = sum(count * processor.cache_side(name == "train") ** 2 * 3 for name, count in rows.items())
    free = shutil.disk_usage(root).free
    if needed < AUTO_DISK_SHARE * free:
        return dict.fromkeys(rows, option), ""
    on_device = cuda and processor.settings.image_size >= AUTO_DEVICE_MIN_SIZE
    chosen = {name: DEVICE if name == "train" and on_device else None for name in rows}
    how = "training JPEGs decoded on the GPU" if on_device else "images decoded on the host"
    return (
        chosen,
        f"data.cache auto: the images need {needed / 2**30:.1f} GiB, {root} has {free / 2**30:.1f} GiB free: {how}",
    )


def open_cache(split: Dataset, reader, augment: bool, option: str) -> ImageCache:
    """The cache entry of `split`'s images (for training crops with `augment`), built first when missing or out of
    date."""
    root = cache_root(option)
    root.mkdir(parents=True, exist_ok=True)
    key = _key(split, reader, augment)
    entry = root / key
    with FileLock(str(root / f"{key}.lock")):
        files = _files_digest(split, reader)
        cache = _load(entry, files)
        if cache is None:
            with atomic_directory(entry) as staging:
                _build(staging, split, reader, augment, files)
            cache = _load(entry, files)
    return cache


def _key(split: Dataset, reader, augment: bool) -> str:
    processor = reader.processor.settings
    settings = {
        "format": CACHE_FORMAT,
        "fingerprint": split._fingerprint,
        "rows": len(split),
        "split": reader.split,
        "held_out": reader.held_out,
        "image_column": reader.config.image_column,
        "root": None if reader.root is None else os.path.abspath(reader.root),
        "max_image_pixels": reader.config.max_image_pixels,
        "training_crops": augment,
        "side": reader.processor.cache_side(augment),
        "image": [processor.image_size, processor.resize, processor.interpolation, processor.crop_pct],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def _image_values(split: Dataset, column: str):
    for batch in split.select_columns([column]).iter(batch_size=READ_BATCH):
        yield from batch[column]


def _files_digest(split: Dataset, reader) -> str:
    """Size and modification time of every image file the rows name by path (images stored in the data itself are
    covered by the fingerprint)."""
    digest = hashlib.sha256()
    for value in _image_values(split, reader.config.image_column):
        reference = path_of(value)
        if reference is None:
            continue
        try:
            stat = os.stat(reader.image_path(reference, "image cache"))
            digest.update(f"{reference}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except (OSError, BadInputError):  # missing, or outside the data directory: the row checks say which
            digest.update(f"{reference}\0missing\n".encode())
    return digest.hexdigest()


def _load(entry: Path, files: str) -> ImageCache | None:
    """The entry if it is complete and the image files are unchanged."""
    try:
        index = json.loads((entry / INDEX_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if index.get("files") != files:
        return None
    errors = {int(position): message for position, message in index["errors"].items()}
    present, sizes = np.load(entry / PRESENT_NAME), np.load(entry / SIZES_NAME)
    return ImageCache(entry, index["side"], index["count"], errors, present, sizes)


def _build(directory: Path, split: Dataset, reader, augment: bool, files: str) -> None:
    """Decode every image of `split` (on all cores) and store what `FusionProcessor.cache_pixels` makes of it, with
    its size; keep bad rows' errors."""
    count, side = len(split), reader.processor.cache_side(augment)
    images = np.memmap(directory / IMAGES_NAME, dtype=np.uint8, mode="w+", shape=(max(1, count), side, side, 3))
    numbers = split[ROW_COLUMN] if ROW_COLUMN in split.column_names else range(count)
    errors: dict[int, str] = {}
    present = np.zeros(count, dtype=bool)
    sizes = np.zeros((count, 2), dtype=np.int32)

    def decode(item: tuple[int, Any, int]) -> None:
        position, value, number = item
        try:
            image = reader.image(value, number)
        except BadInputError as error:
            errors[position] = str(error)
            return
        if image is not None:
            images[position] = reader.processor.cache_pixels(image, augment)
            present[position], sizes[position] = True, image.size

    values = _image_values(split, reader.config.image_column)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes and resizes without the GIL
        for _ in pool.map(decode, zip(range(count), values, numbers)):
            pass
    images.flush()
    np.save(directory / PRESENT_NAME, present)
    np.save(directory / SIZES_NAME, sizes)
    index = {"side": side, "count": count, "files": files, "errors": errors}
    (directory / INDEX_NAME).write_text(json.dumps(index))  # written last: an entry with an index is complete
