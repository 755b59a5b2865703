"""Predictor: a checkpoint in, per-task predictions for raw images and texts out.

    predictor = Predictor.from_pretrained("runs/mine/best")      # or a Hugging Face Hub id
    predictor.predict(["cat.jpg", None], ["a photo of a cat", "a dog"])
    # [{"topic": {"label": "cat", "scores": {"cat": 0.93, ...}}, "score": {"value": 4.1}, ...}, ...]
    predictor.predict(frame)           # a pandas DataFrame in, a DataFrame of predictions on its index out
    predictor.evaluate(frame)          # labelled rows in, the metrics of `mmfusion evaluate` out

Rows go through the same `RowReader` and `Collator` as training and evaluation, so an image or a text is
turned into model inputs exactly as it was when the model was trained. A missing image or text (None) is
replaced by the model's learned placeholder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import DataConfig, TaskSpec
from .data import SPLIT_ALIASES
from .errors import BadInputError
from .frames import column, is_frame, is_missing, predictions_frame
from .hub import resolve_checkpoint
from .model import FusionModel, FusionOutput
from .processing import FusionProcessor
from .rows import Collator, RowReader, model_inputs

if TYPE_CHECKING:
    import pandas

ImageInput = Image.Image | str | os.PathLike | bytes | None
IMAGE, TEXT = "image", "text"  # the column names of the rows built here
BACKENDS = ("torch", "onnx")


class Predictor:
    """A FusionModel and its processor in eval mode on one device (CUDA when available)."""

    def __init__(
        self, model: FusionModel, processor: FusionProcessor, device: str | None = None, batch_size: int = 64
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.batch_size = batch_size
        self.collate = Collator(processor.settings.pad_id)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, device: str | None = None, batch_size: int = 64, backend: str = "torch"
    ) -> Predictor:
        """Load model and processor from a checkpoint directory or a Hub model id (see `hub.resolve_checkpoint`).
        `backend="onnx"`: a directory written by `mmfusion export`, run with onnxruntime on the CPU."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        directory = resolve_checkpoint(str(name_or_path))
        if backend == "onnx":
            from .export import OnnxFusionModel

            model, device = OnnxFusionModel.from_pretrained(directory), "cpu"
        else:
            model = FusionModel.from_pretrained(directory)
        return cls(model, FusionProcessor.from_pretrained(directory), device, batch_size)

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.model.config.tasks

    def row_reader(self, image_root: Path) -> RowReader:
        """A RowReader for {image, text} rows without labels; absent modalities take the placeholder."""
        config = DataConfig(
            image_column=IMAGE, text_column=TEXT, max_image_pixels=self.processor.settings.max_image_pixels
        )
        return RowReader(self.processor, [], config, image_root, "input", allow_missing_modality=True)

    def predict(
        self,
        images: Sequence[ImageInput] | pandas.DataFrame,
        texts: Sequence[str | None] | None = None,
        image_root: str | os.PathLike | None = None,
        progress: bool = False,
        image_column: str | None = None,
        text_column: str | None = None,
    ) -> list[dict[str, dict[str, Any]]] | pandas.DataFrame:
        """Per input, per task: the prediction (see `describe`). Relative image paths start from `image_root`
        (default: the working directory). Raises BadInputError naming the row for a missing or unreadable image,
        an empty text, or a row with neither image nor text.

        Given a DataFrame instead of `images` and `texts`: its `image_column` and `text_column` (default: the
        columns the model was trained on, from processor.json) are the inputs, and the result is a DataFrame on the
        same index (see `frames.predictions_frame`)."""
        if is_frame(images):
            if texts is not None:
                raise ValueError("give a DataFrame alone (texts come from its text_column), or images and texts")
            settings = self.processor.settings
            frame = images
            images = column(frame, image_column or settings.image_column, "image_column")
            texts = column(frame, text_column or settings.text_column, "text_column")
            predictions = self.predict(images, texts, image_root, progress)
            return predictions_frame(predictions, self.tasks, frame.index)
        if texts is None:
            raise ValueError("give one text per image (None for no text), or a DataFrame")
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts; give one of each per input (or None)")
        # Paths are made absolute here, so the reader's root is the filesystem root and any path is allowed.
        root = Path(image_root or Path.cwd()).absolute()
        reader = self.row_reader(Path(root.anchor))
        predictions = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
            indices = range(start, min(start + self.batch_size, len(images)))
            rows = [reader.read({IMAGE: _reference(images[i], root, i), TEXT: texts[i]}, i) for i in indices]
            predictions += self.predict_batch(self.collate(rows))
        return predictions

    def evaluate(
        self,
        data,
        split: str = "test",
        image_column: str | None = None,
        text_column: str | None = None,
        config: DataConfig | None = None,
    ) -> dict:
        """The metrics `mmfusion evaluate` reports (the same code path): per task its metrics and label count, and
        the summary. `data`: a DataFrame or `datasets.Dataset` (evaluated as `split`), a dict of DataFrames per
        split, a DatasetDict, or a path as for --data.path. Labels are read from the tasks' columns. `config`
        (default: the columns and image root the model was trained with, from processor.json, and
        missing_modality="placeholder", so rows without an image or a text use the placeholders) sets the columns,
        image_root, on_error and the rest."""
        import datasets

        from .evaluation import checkpoint_data_config, evaluate_checkpoint

        given = frozenset({"--data.missing_modality"})  # the placeholders, as in predict
        config = config or checkpoint_data_config(
            DataConfig(missing_modality="placeholder"), self.processor.settings, given
        )
        columns = {"image_column": image_column, "text_column": text_column}
        config = dataclasses.replace(config, **{key: value for key, value in columns.items() if value is not None})
        split = SPLIT_ALIASES.get(split, split)
        if is_frame(data):
            data = {split: data}
        elif isinstance(data, datasets.Dataset):
            data = datasets.DatasetDict({split: data})
        cpu = self.device.type == "cpu"
        result = evaluate_checkpoint(self.model, self.processor, config, split, self.batch_size, source=data, cpu=cpu)
        return result.metrics

    @torch.no_grad()
    def predict_batch(self, batch: dict) -> list[dict[str, dict[str, Any]]]:
        """One collated batch through the model, described per sample."""
        inputs = {key: value.to(self.device) for key, value in model_inputs(batch).items()}
        output = self.model(**inputs)
        both = (batch["image_present"] & batch["text_present"]).tolist()
        per_task = {spec.name: describe(spec, output, both) for spec in self.tasks}
        return [{name: values[i] for name, values in per_task.items()} for i in range(len(both))]


def _reference(image: ImageInput, root: Path, index: int) -> Image.Image | bytes | str | None:
    """What `RowReader.load_image` takes: a PIL image, bytes, None (also for NaN), or an absolute path (an empty
    one is left to its check)."""
    if is_missing(image):
        return None
    if isinstance(image, (Image.Image, bytes)):
        return image
    if isinstance(image, (str, os.PathLike)):
        return str(root / image) if str(image).strip() else str(image)
    raise BadInputError(f"input row {index}: expected an image path, bytes or a PIL image, got {type(image).__name__}")


def evaluate(
    checkpoint: str | os.PathLike,
    data,
    split: str = "test",
    image_column: str | None = None,
    text_column: str | None = None,
    config: DataConfig | None = None,
    device: str | None = None,
    batch_size: int = 64,
) -> dict:
    """`mmfusion evaluate CHECKPOINT` from Python: the metrics of `split` of `data` (see `Predictor.evaluate`)."""
    predictor = Predictor.from_pretrained(str(checkpoint), device, batch_size)
    return predictor.evaluate(data, split, image_column, text_column, config)


def label_names(spec: TaskSpec) -> list[str]:
    """The task's class names; class indices as strings when the checkpoint has none."""
    return list(spec.labels) if spec.labels else [str(i) for i in range(spec.out_features)]


def describe(spec: TaskSpec, output: FusionOutput, both_present: list[bool]) -> list[dict[str, Any]]:
    """One task's predictions for a batch, in the task's own terms.

    classification: {"label", "scores": {label: probability}}; multilabel: {"labels" (probability >= 0.5),
    "scores"}; regression: {"value"} in the target's original units; matching: {"score"}, the cosine similarity
    of the image and text embeddings (None when the image or the text is missing: a placeholder has no match).
    """
    if spec.type == "matching":
        image, text = output.extras["matching_embeddings"][spec.name].float().chunk(2, dim=-1)
        similarity = torch.nn.functional.cosine_similarity(image, text, dim=-1).tolist()
        return [{"score": score if present else None} for score, present in zip(similarity, both_present)]
    logits = output.logits[spec.name].float().cpu()
    if spec.type == "regression":
        values = (logits.reshape(-1) * spec.target_std + spec.target_mean).tolist()
        return [{"value": value} for value in values]
    names = label_names(spec)
    probabilities = logits.softmax(-1) if spec.type == "classification" else logits.sigmoid()
    scores = [dict(zip(names, row)) for row in probabilities.tolist()]
    if spec.type == "classification":
        best = probabilities.argmax(-1).tolist()
        return [{"label": names[i], "scores": row} for i, row in zip(best, scores)]
    return [{"labels": [name for name, p in row.items() if p >= 0.5], "scores": row} for row in scores]
