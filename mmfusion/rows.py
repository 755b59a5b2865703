"""One row at a time: checking and encoding rows (RowReader), the map-style dataset that serves them, and batching
(streams are in streams.py).

Bad rows follow `data.on_error`: `raise` names the split, row and field; `skip` drops and counts them.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from .config import DataConfig, TaskSpec
from .data import ROW_COLUMN
from .device_decode import is_jpeg
from .errors import BadInputError, DataError
from .image_cache import ImageCache
from .masks import mask_target, read_mask
from .processing import FusionProcessor, open_image, path_of


@dataclass
class SkipReport:
    """Rows dropped under `on_error: skip`, counted by split and reason, with the first few messages."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    truncated: Counter = field(default_factory=Counter)  # texts cut to max_text_length, by split

    def add(self, split: str, reason: str, message: str) -> None:
        self.counts[(split, reason)] += 1
        if len(self.examples) < 10:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [f"skipped {self.total} bad rows" if self.total else "no rows skipped"]
        lines += [f"  {split}: {count} x {reason}" for (split, reason), count in sorted(self.counts.items())]
        lines += [f"  e.g. {example}" for example in self.examples[:3]]
        lines += [f"  {split}: {n} texts truncated to max_text_length" for split, n in sorted(self.truncated.items())]
        return "\n".join(lines)


# ----- rows -----


@dataclass
class RowReader:
    """Turns one raw row into model-ready tensors, or raises BadInputError naming split, row and field."""

    processor: FusionProcessor
    tasks: list[TaskSpec]
    config: DataConfig
    root: Path | None  # the directory image paths must stay in; None: paths as given (data built in Python)
    split: str
    allow_missing_modality: bool = False
    held_out: bool = False  # a validation split cut from train: its rows are numbered as in the train data

    def where(self, index: int) -> str:
        if self.held_out:
            return f"{self.split} split (held out of the train data), train row {index}"
        return f"{self.split} split, row {index}"

    def image_path(self, reference: str, where: str, kind: str = "image") -> Path:
        """A relative (or absolute) path that must stay inside the data directory (when there is one)."""
        if self.root is None:
            return Path(reference)
        root = os.path.normpath(os.path.abspath(self.root))
        resolved = os.path.normpath(os.path.join(root, reference))
        if os.path.commonpath([root, resolved]) != root:
            raise BadInputError(f"{where}: {kind} path {reference!r} escapes the data directory {root}")
        return Path(resolved)

    def load_image(self, value: Any, where: str):
        if value is None:
            return None
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            value = value["path"]
        if isinstance(value, str):
            if not value.strip():
                raise BadInputError(f"{where}: empty image path")
            value = str(self.image_path(value, where))
        return open_image(value, self.config.max_image_pixels, where)

    def load_mask(self, spec: TaskSpec, value: Any, where: str, image) -> Any:
        """A dense task's mask (masks.read_mask), checked against its image when there is one; None: no mask."""
        if value is None:
            return None
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            if not value.strip():
                raise BadInputError(f"{where}: empty mask path")
            value = self.image_path(value, where, kind="mask")
        return read_mask(spec, value, where, None if image is None else image.size)

    def encoded_image(self, value: Any, index: int) -> bytes | np.ndarray:
        """Row `index`'s image for `DeviceDecoder`: a JPEG's bytes as stored, any other image decoded here (uint8
        H x W x 3), since nvJPEG decodes only JPEG."""
        data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
        reference = path_of(value)
        if data is None and reference is not None:
            where = f"{self.where(index)}, field {self.config.image_column!r} (file {reference})"
            try:
                data = self.image_path(reference, where).read_bytes()
            except OSError as error:
                raise BadInputError(f"{where}: image file is not readable ({error})") from None
        if data is not None and is_jpeg(data):
            return data
        return np.asarray(self.image(value, index), dtype=np.uint8)

    def text(self, value: Any, where: str) -> str | None:
        if value is None:
            return None
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInputError(f"{where}: text is not valid UTF-8") from None
        if not isinstance(value, str):
            raise BadInputError(f"{where}: expected text (a string), got {type(value).__name__} {value!r}")
        if not value.strip():
            raise BadInputError(f"{where}: text is empty")
        if "\ufffd" in value:
            raise BadInputError(f"{where}: text contains undecodable bytes (U+FFFD replacement characters)")
        return value

    def image(self, value: Any, index: int):
        """Row `index`'s image value decoded (None when missing), or BadInputError naming split, row and field."""
        return self.load_image(value, f"{self.where(index)}, field {self.config.image_column!r}" + _file_hint(value))

    def parse(self, row: dict, index: int, decode_image: bool = True) -> tuple[Any, str | None, dict, dict]:
        """(image, text, labels, label masks) of one row, or BadInputError naming split, row and field.
        Without `decode_image` the image is only checked to be present (it is then returned as given)."""
        where = self.where(index)
        image_value = row.get(self.config.image_column)
        image = self.image(image_value, index) if decode_image else image_value
        text = self.text(row.get(self.config.text_column), f"{where}, field {self.config.text_column!r}")
        if (image is None or text is None) and not self.allow_missing_modality:
            missing = self.config.image_column if image is None else self.config.text_column
            raise BadInputError(f"{where}: field {missing!r} is missing (set data.missing_modality: placeholder)")
        if image is None and text is None:
            raise BadInputError(f"{where}: both the image and the text are missing")
        labels, masks = {}, {}
        for spec in self.tasks:
            value = row.get(spec.column) if spec.column in row else None
            field_where = f"{where}, field {spec.column!r}"
            if spec.is_dense:  # the stored mask, checked; read() puts it through its image's geometry
                decoded = decode_image and image is not None
                labels[spec.name] = (
                    self.load_mask(spec, value, field_where + _file_hint(value), image) if decoded else value
                )
                masks[spec.name] = value is not None
            else:
                labels[spec.name], masks[spec.name] = self.processor.encode_label(spec, value, field_where)
        return image, text, labels, masks

    def read(
        self,
        row: dict,
        index: int,
        epoch: int = 0,
        augment: bool = False,
        seed: int = 0,
        modality_dropout: float = 0.0,
        images: ImageCache | None = None,
        position: int = 0,
        on_device: bool = False,
    ) -> dict:
        """Decode and encode one row (its image taken from `images` at `position` when given). `augment` uses
        randomness from (seed, epoch, index) only. `on_device`: the image is left for `DeviceDecoder` (JPEG bytes,
        or another format decoded here) with its augmentation key, instead of pixel values."""
        image, text, labels, masks = self.parse(row, index, decode_image=images is None and not on_device)
        size = None
        if images is not None:
            image, size = images.image(position)
        image_present, text_present = presence(
            image is not None, text is not None, modality_dropout, seed, epoch, index
        )
        key = (seed, epoch, index) if augment else None
        for spec in (spec for spec in self.tasks if spec.is_dense):  # no image (or dropped): no map to predict
            mask = labels[spec.name] if image_present and masks[spec.name] else None
            labels[spec.name], masks[spec.name] = mask_target(self.processor, spec, mask, key)
        if on_device:
            source = self.encoded_image(image, index) if image_present else None
            pixels = {"image_source": source, "augment_key": key}
        else:
            image_tensor = self.processor.image_tensor
            pixels = {"pixel_values": image_tensor(image, key, size) if image_present else self.processor.blank_image()}
        return {
            "row": index,
            **pixels,
            "input_ids": self.processor.encode_text(text) if text_present else [self.processor.settings.pad_id],
            "image_present": image_present,
            "text_present": text_present,
            "labels": labels,
            "label_mask": masks,
        }


def presence(image: bool, text: bool, modality_dropout: float, seed: int, epoch: int, index: int) -> tuple[bool, bool]:
    """Which modalities a row presents in this epoch: with `modality_dropout`, a row that has both drops one of
    them, drawn from (seed, epoch, index) only."""
    if modality_dropout > 0 and image and text:
        draw = np.random.default_rng([seed, epoch, index, 7]).random(2)
        if draw[0] < modality_dropout:
            return (False, True) if draw[1] < 0.5 else (True, False)
    return image, text


def _file_hint(value: Any) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f" (file {path})" if path else ""


def reason(message: str) -> str:
    """A short category of a bad row's message, for the skip counts."""
    for needle, reason in (
        ("mask file not found", "missing mask file"),
        ("mask path", "mask path outside the data directory"),
        ("not a readable mask", "unreadable mask"),
        ("mask is corrupt", "unreadable mask"),
        ("mask file is not readable", "unreadable mask"),
        ("does not match its image", "mask size mismatch"),
        ("out of range for task", "mask class id out of range"),
        ("mask", "bad mask"),
        ("not found", "missing image file"),
        ("escapes", "image path outside the data directory"),
        ("decompression bomb", "image too large"),
        ("corrupt or truncated", "corrupt image"),
        ("not a readable image", "unreadable image"),
        ("permission", "unreadable image"),
        ("not valid UTF-8", "non-UTF-8 text"),
        ("undecodable", "non-UTF-8 text"),
        ("text is empty", "empty text"),
        ("is missing", "missing modality"),
        ("not seen in training", "unseen label"),
        ("expected", "wrong field type"),
        ("not finite", "non-finite target"),
    ):
        if needle in message:
            return reason
    return "bad row"


def check_rows(
    split: Dataset,
    name: str,
    reader: RowReader,
    report: SkipReport,
    on_error: str,
    verify_images: bool = True,
    images: ImageCache | None = None,
) -> list[int]:
    """Read every row once; return the positions of the good rows (skip) or raise at the first bad one (raise).
    With `images` (the split's image cache) each image's check is the cache's: nothing is decoded again."""
    keep = []
    truncated_before = reader.processor.truncated
    for index, row in enumerate(split):
        try:
            if images is not None and index in images.errors:
                raise BadInputError(images.errors[index])
            decode = verify_images and images is None
            _, text, _, _ = reader.parse(row, row.get(ROW_COLUMN, index), decode_image=decode)
            if text is not None:
                reader.processor.encode_text(text)  # counts truncations
        except BadInputError as error:
            if on_error == "raise":
                raise
            report.add(name, reason(str(error)), str(error))
            continue
        keep.append(index)
    if reader.processor.truncated > truncated_before:
        report.truncated[name] += reader.processor.truncated - truncated_before
    if not keep:
        raise DataError(f"the {name} split has no usable rows ({report.summary()})")
    return keep


def select_rows(split: Dataset, keep: list[int]) -> Dataset:
    """The kept rows; when some were dropped, each keeps its original number (ROW_COLUMN) for messages."""
    if len(keep) == len(split):
        return split
    if ROW_COLUMN not in split.column_names:
        split = split.add_column(ROW_COLUMN, list(range(len(split))))
    return split.select(keep)


def check_split(
    split: Dataset, name: str, reader: RowReader, report: SkipReport, on_error: str, verify_images: bool = True
) -> Dataset:
    """The split without its bad rows (skip), or BadInputError at the first (raise)."""
    return select_rows(split, check_rows(split, name, reader, report, on_error, verify_images))


class FusionDataset(torch.utils.data.Dataset):
    """Map-style dataset over checked rows; `set_epoch` changes the augmentation draw."""

    def __init__(
        self,
        split: Dataset,
        reader: RowReader,
        augment: bool = False,
        seed: int = 0,
        modality_dropout: float = 0.0,
        images: ImageCache | None = None,
        on_device: bool = False,
    ) -> None:
        self.split, self.reader, self.augment, self.seed = split, reader, augment, seed
        self.modality_dropout, self.images, self.on_device = modality_dropout, images, on_device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch of rows, fetched from the table in one read (the DataLoader calls this for each batch)."""
        indices = [int(index) for index in indices]
        columns = self.split[indices]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return [
            self.reader.read(
                row,
                row.get(ROW_COLUMN, index),
                self.epoch,
                self.augment,
                self.seed,
                self.modality_dropout,
                self.images,
                index,
                self.on_device,
            )
            for index, row in zip(indices, rows)
        ]

    def describe(self, number: int) -> str:
        """Where row `number` (as in error messages and batch["row"]) comes from."""
        rows = self.split[ROW_COLUMN] if ROW_COLUMN in self.split.column_names else None
        row = self.split[rows.index(number) if rows is not None else number]
        image = row.get(self.reader.config.image_column)
        return f"{self.reader.split} row {number}" + _file_hint(image)


@dataclass
class Collator:
    """Stacks rows into a batch: texts padded to the longest in the batch, labels with per-sample masks."""

    pad_id: int = 0

    def __call__(self, rows: list[dict]) -> dict:
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row["input_ids"])] = torch.as_tensor(row["input_ids"])
            attention_mask[i, : len(row["input_ids"])] = 1 if row["text_present"] else 0
        tasks = rows[0]["labels"].keys()
        if "image_source" in rows[0]:  # left for DeviceDecoder, which adds pixel_values on the device
            images = {key: [row[key[:-1]] for row in rows] for key in ("image_sources", "augment_keys")}
        else:
            images = {"pixel_values": torch.stack([row["pixel_values"] for row in rows])}
        return {
            **images,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_present": torch.tensor([row["image_present"] for row in rows]),
            "text_present": torch.tensor([row["text_present"] for row in rows]),
            "labels": {task: torch.stack([row["labels"][task] for row in rows]) for task in tasks},
            "label_mask": {task: torch.tensor([row["label_mask"][task] for row in rows]) for task in tasks},
            "row": torch.tensor([row["row"] for row in rows]),
        }


MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "image_present", "text_present", "features")


def model_inputs(batch: dict, without: tuple[str, ...] = ()) -> dict:
    """The batch entries that `FusionModel.forward` takes besides labels (a feature-cache batch has `features`
    instead of pixels and tokens); each modality in `without` ("image", "text") is marked absent in every row (the
    model then uses its learned placeholder)."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    for modality in without:
        inputs[f"{modality}_present"] = torch.zeros_like(inputs[f"{modality}_present"])
    return inputs


def loader_workers(data: DataConfig, accelerator) -> int:
    """`--data.num_workers`, or when unset: 4 per process on a CUDA device (at most the CPUs this process may use,
    shared among the machine's processes); 0 on CPU, where a worker takes a core from the model
    (benchmarks/data_throughput.py measures both); 0 for a stream, which is read in the main process."""
    if data.num_workers is not None:
        return data.num_workers
    if data.streaming or accelerator.device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return min(4, cpus // max(1, local_processes))


def make_loader(
    dataset, batch_size: int, pad_id: int, shuffle: bool, workers: int, collate=None
) -> torch.utils.data.DataLoader:
    """Batches of `dataset`, collated by `collate` (default: `Collator(pad_id)`)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not isinstance(dataset, torch.utils.data.IterableDataset),
        collate_fn=collate or Collator(pad_id),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # workers are re-created each epoch and so see the dataset's new epoch
        prefetch_factor=4 if workers else None,
    )
