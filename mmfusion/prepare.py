"""Data preparation: the splits of a dataset as checked, model-ready datasets, and what was learned on the way.

Training calls `build_splits` (tasks inferred and fitted on train, a processor built or taken from a checkpoint);
evaluation and the report call `load_split` with a checkpoint's processor and tasks. Both read every split through
`split_dataset`, so a row is checked the same way everywhere. Nothing here changes the configuration it is given:
what the data decides for the model (the tasks with their label maps and statistics, the vocabulary size, the
longest text) comes back in `Prepared`, and the trainer applies it in one visible place.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import Config, DataConfig, TaskSpec
from .data import ROW_COLUMN, LoadedData, check_columns, fit_tasks, infer_tasks, label_counts, load_splits
from .device_decode import DEVICE
from .errors import BadInputError, DataError
from .image_cache import open_cache, resolve_auto
from .masks import stored_values
from .pretrained import image_settings_for, text_settings_for
from .processing import FusionProcessor, ProcessorSettings, hf_tokenizer, train_tokenizer
from .rows import FusionDataset, RowReader, SkipReport, check_rows, select_rows
from .streams import FusionStream


@dataclass
class Prepared:
    """Checked datasets per split, the processor that encodes them, and what the data decided for the model."""

    tasks: list[TaskSpec]
    processor: FusionProcessor
    datasets: dict[str, torch.utils.data.Dataset]
    report: SkipReport
    notes: list[str] = field(default_factory=list)  # what was inferred or chosen, to show the user
    model_settings: dict[str, Any] = field(default_factory=dict)  # FusionConfig fields the data decided
    source: str = ""  # where the data came from (a path, or what was passed in Python)
    label_counts: dict[str, list[int]] = field(default_factory=dict)  # train rows per class, for train.class_balance


def data_settings(data: DataConfig) -> dict[str, Any]:
    """The data options a checkpoint remembers in processor.json, so evaluation and prediction read the same columns
    the same way without being told again."""
    return {
        "image_column": data.image_column,
        "text_column": data.text_column,
        "image_root": data.image_root,
        "missing_modality": data.missing_modality,
    }


def build_processor(config: Config, loaded: LoadedData) -> tuple[FusionProcessor, dict[str, Any]]:
    """The HF model's tokenizer for `hf`, else a tokenizer trained on the training text; returns the processor and
    the model settings that follow from it (vocabulary size, longest text). Images and texts are prepared as the
    pretrained encoders expect (`pretrained.image_settings_for`); `config.model` is resolved."""
    model, data = config.model, config.data
    images, texts = image_settings_for(model, data), text_settings_for(model, data)
    settings = ProcessorSettings(**images, **texts, max_image_pixels=data.max_image_pixels, **data_settings(data))
    learned: dict[str, Any] = {"max_text_length": max(model.max_text_length, data.max_text_length)}
    if model.text_encoder == "hf":
        tokenizer, settings.pad_id = hf_tokenizer(model.text_model)
    else:
        train = loaded.splits["train"]
        texts = train[data.text_column] if not loaded.streaming else (r[data.text_column] for r in train.take(100_000))
        tokenizer = train_tokenizer((t for t in texts if isinstance(t, str)), data.tokenizer, model.vocab_size)
        learned["vocab_size"] = tokenizer.get_vocab_size()
    return FusionProcessor(tokenizer, settings), learned


DENSE_STATISTICS_ROWS = 200
"""Training rows whose masks give a dense_regression task's target mean and standard deviation."""


def fit_dense_statistics(
    tasks: list[TaskSpec], loaded: LoadedData, processor: FusionProcessor, data: DataConfig
) -> list[TaskSpec]:
    """dense_regression tasks with the mean and standard deviation of their valid target pixels in the first
    DENSE_STATISTICS_ROWS training masks (the head predicts standardised values; with the silog loss it predicts
    log values and needs none). Bad rows are left to the row checks."""
    wanted = [spec for spec in tasks if spec.type == "dense_regression" and spec.loss != "silog"]
    if not wanted:
        return tasks
    reader = RowReader(processor, wanted, data, loaded.roots["train"], "train", allow_missing_modality=True)
    values: dict[str, list[np.ndarray]] = {spec.name: [] for spec in wanted}
    for index, row in enumerate(itertools.islice(loaded.splits["train"], DENSE_STATISTICS_ROWS)):
        try:
            _, _, labels, _ = reader.parse(row, row.get(ROW_COLUMN, index))
        except BadInputError:
            continue
        for spec in wanted:
            if isinstance(labels[spec.name], np.ndarray):
                found = stored_values(spec, labels[spec.name])
                values[spec.name].append(found[np.isfinite(found)])
    fitted = {}
    for spec in wanted:
        pixels = np.concatenate(values[spec.name]) if values[spec.name] else np.zeros(0)
        if not pixels.size:
            raise DataError(f"dense_regression task {spec.name!r}: no valid target pixels in the first training masks")
        std = float(pixels.std()) or 1.0
        fitted[spec.name] = dataclasses.replace(spec, target_mean=float(pixels.mean()), target_std=std)
    return [fitted.get(spec.name, spec) for spec in tasks]


def split_dataset(
    loaded: LoadedData,
    name: str,
    processor: FusionProcessor,
    tasks: list[TaskSpec],
    data: DataConfig,
    report: SkipReport,
    augment: bool = False,
    seed: int = 0,
    modality_dropout: float = 0.0,
) -> torch.utils.data.Dataset:
    """Split `name` as a dataset of model-ready rows: every row checked (bad ones raise, or are skipped and counted
    in `report`), or, for a stream, checked as it arrives. With `data.cache` its images come from the image cache
    (built on first use)."""
    allow_missing = data.missing_modality == "placeholder"
    held_out = name == "validation" and loaded.held_out
    reader = RowReader(processor, tasks, data, loaded.roots[name], name, allow_missing, held_out)
    split = loaded.splits[name]
    if loaded.streaming:
        training, buffer = name == "train", data.shuffle_buffer  # a training stream is shuffled and split
        return FusionStream(split, reader, data.on_error, augment, seed, modality_dropout, training, buffer)
    stored = data.cache is not None and data.cache != DEVICE  # DEVICE: training JPEGs decoded on the accelerator
    images = open_cache(split, reader, augment, data.cache) if stored else None
    keep = check_rows(split, name, reader, report, data.on_error, data.verify_images, images)
    images = images.select(keep) if images is not None else None
    on_device = data.cache == DEVICE and name == "train"
    return FusionDataset(select_rows(split, keep), reader, augment, seed, modality_dropout, images, on_device)


def build_splits(
    config: Config, processor: FusionProcessor | None = None, splits=("train", "validation", "test"), source=None
) -> Prepared:
    """For training: load the data (`source`, else `config.data.path`), infer (when not given) and fit the tasks on
    train, build the processor (unless one is given, e.g. a pretrained checkpoint's), and check every row of the
    requested splits."""
    data = config.data
    loaded = load_splits(data.path if source is None else source, data)
    tasks, notes = (config.tasks, []) if config.tasks else infer_tasks(loaded.splits["train"], data)
    present = [name for name in splits if name in loaded.splits]
    for name in present:
        check_columns(loaded.splits[name], name, tasks, data)
    tasks = fit_tasks(tasks, loaded.splits["train"], data)
    counts = label_counts(tasks, loaded.splits["train"]) if config.train.class_balance else {}
    learned: dict[str, Any] = {}
    if processor is None:
        processor, learned = build_processor(config, loaded)
    tasks = fit_dense_statistics(tasks, loaded, processor, data)
    report = SkipReport()
    rows = {name: len(loaded.splits[name]) for name in present} if not loaded.streaming else {}
    caches, cache_note = resolve_auto(data.cache, rows, processor, torch.cuda.is_available())
    datasets = {
        name: split_dataset(
            loaded,
            name,
            processor,
            tasks,
            dataclasses.replace(data, cache=caches.get(name)),
            report,
            augment=name == "train" and data.augment,
            seed=config.train.seed,
            modality_dropout=config.train.modality_dropout if name == "train" else 0.0,
        )
        for name in present
    }
    notes = [f"tasks: {note}" for note in notes] + ([cache_note] if cache_note else [])
    return Prepared(tasks, processor, datasets, report, notes, learned, loaded.source, counts)


def load_split(
    data: DataConfig, split: str, processor: FusionProcessor, tasks: list[TaskSpec], source: Any = None
) -> tuple[torch.utils.data.Dataset, SkipReport]:
    """For evaluation: the checked rows of one split, encoded with a checkpoint's processor and label maps (so a
    label the model never saw is a bad row), and the skip report. Data without a validation split gives the rows
    that training held out of train as its validation split. `source`: anything `load_splits` takes (default:
    data.path)."""
    source = data.path if source is None else source
    loaded = load_splits(source, data, for_training=False)
    if split == "validation" and split not in loaded.splits and "train" in loaded.splits:
        loaded = load_splits(source, data, for_training=True)  # the rows training held out of train
    if split not in loaded.splits:
        raise DataError(
            f"{loaded.source}: no {split!r} split; it has {sorted(loaded.splits)} (choose one with --split)"
        )
    check_columns(loaded.splits[split], split, tasks, data)
    report = SkipReport()
    dataset = split_dataset(loaded, split, processor, tasks, data, report)
    return dataset, dataset.report if isinstance(dataset, FusionStream) else report
