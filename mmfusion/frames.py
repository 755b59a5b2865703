"""pandas DataFrames in and out: rows of a DataFrame as a `datasets.Dataset`, predictions as a DataFrame.

An image cell may be a path (relative to `data.image_root`, default the working directory), bytes, a PIL image,
or missing (None/NaN); a text cell a string or missing. pandas is imported only by the caller that has a frame.
"""

from __future__ import annotations

import io
import math
import os
import sys
from typing import Any

from PIL import Image

from .config import TaskSpec
from .errors import BadInputError, DataError


def is_frame(value: Any) -> bool:
    """A pandas DataFrame (checked without importing pandas: if it is not imported, nothing is a DataFrame)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.DataFrame)


def is_missing(value: Any) -> bool:
    """None, or the NaN/NA pandas puts in an empty cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    pandas = sys.modules.get("pandas")
    return pandas is not None and value is pandas.NA


def column(frame, name: str, option: str) -> list:
    """A column's values with missing cells as None; a missing column names the option that chose it."""
    if name not in frame.columns:
        raise DataError(f"DataFrame has no column {name!r} ({option}); its columns are {list(frame.columns)}")
    return [None if is_missing(value) else value for value in frame[name].tolist()]


def image_bytes(image: Image.Image) -> bytes:
    """A PIL image as lossless bytes (PNG, or TIFF for modes PNG cannot hold), so its pixels arrive unchanged."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG")
    except (OSError, KeyError):
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
    return buffer.getvalue()


def image_cell(value: Any, where: str) -> dict | None:
    """One image cell as the {"bytes", "path"} record of a `datasets.Image` column."""
    if is_missing(value):
        return None
    if isinstance(value, Image.Image):
        return {"bytes": image_bytes(value), "path": None}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, (str, os.PathLike)):
        return {"bytes": None, "path": os.fspath(value)}
    raise BadInputError(f"{where}: expected an image path, bytes or a PIL image, got {type(value).__name__}")


def to_dataset(frame, image_column: str):
    """A DataFrame as a `datasets.Dataset` (index dropped). An image column holding anything but paths becomes a
    `datasets.Image` column of bytes and paths, since Arrow cannot hold PIL images or mix bytes with paths."""
    import datasets

    if image_column in frame.columns:
        values = frame[image_column].tolist()
        if any(not is_missing(v) and not isinstance(v, str) for v in values):
            where = [f"DataFrame row {label!r}, field {image_column!r}" for label in frame.index]
            cells = [image_cell(value, place) for value, place in zip(values, where)]
            dataset = datasets.Dataset.from_pandas(frame.assign(**{image_column: cells}), preserve_index=False)
            return dataset.cast_column(image_column, datasets.Image(decode=False))
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def frames_kind(data) -> str | None:
    """What pandas input `data` is: a DataFrame, a dict of DataFrames (any DataFrame among its values), or None."""
    if is_frame(data):
        return "DataFrame"
    if isinstance(data, dict) and any(is_frame(value) for value in data.values()):
        return "dict of DataFrames"
    return None


def to_datasets(data, image_column: str):
    """A DataFrame -> Dataset; a dict of DataFrames per split -> DatasetDict; anything else as it is."""
    import datasets

    kind = frames_kind(data)
    if kind == "DataFrame":
        return to_dataset(data, image_column)
    if kind == "dict of DataFrames":
        others = sorted(f"{split}: {type(frame).__name__}" for split, frame in data.items() if not is_frame(frame))
        if others:
            raise DataError(f"expected a dict of pandas DataFrames per split, got {others}")
        return datasets.DatasetDict({split: to_dataset(frame, image_column) for split, frame in data.items()})
    return data


def predictions_frame(predictions: list[dict[str, dict]], tasks: list[TaskSpec], index):
    """Per-sample predictions (as `Predictor.predict` returns them) as one DataFrame on `index`.

    classification: `<task>` (label) and `<task>_score_<label>` (probability) columns; multilabel: `<task>` (list
    of labels with probability >= 0.5) and score columns; regression: `<task>` in the target's units; matching:
    `<task>` (image-text cosine similarity; NaN when the image or the text is missing)."""
    import pandas

    from .predictor import label_names

    columns: dict[str, list] = {}
    for spec in tasks:
        results = [prediction[spec.name] for prediction in predictions]
        if spec.type == "regression":
            columns[spec.name] = [result["value"] for result in results]
        elif spec.type == "matching":
            columns[spec.name] = [result["score"] for result in results]
        else:
            key = "label" if spec.type == "classification" else "labels"
            columns[spec.name] = [result[key] for result in results]
            for label in label_names(spec):
                columns[f"{spec.name}_score_{label}"] = [result["scores"][label] for result in results]
    return pandas.DataFrame(columns, index=index)
