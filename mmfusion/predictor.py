"""Predictor: a checkpoint in, per-task predictions for raw images and texts out.

    predictor = Predictor.from_pretrained("runs/mine/best")      # or a Hugging Face Hub id
    predictor.predict(["cat.jpg", None], ["a photo of a cat", "a dog"])
    # [{"topic": {"label": "cat", "scores": {"cat": 0.93, ...}}, "score": {"value": 4.1}, ...}, ...]

Rows go through the same `RowReader` and `Collator` as training and evaluation, so an image or a text is
turned into model inputs exactly as it was when the model was trained. A missing image or text (None) is
replaced by the model's learned placeholder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .config import DataConfig, TaskSpec
from .errors import BadInputError
from .hub import resolve_checkpoint
from .model import FusionModel, FusionOutput
from .processing import FusionProcessor
from .rows import Collator, RowReader, model_inputs

ImageInput = Image.Image | str | os.PathLike | None
IMAGE, TEXT = "image", "text"  # the column names of the rows built here


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
    def from_pretrained(cls, name_or_path: str, device: str | None = None, batch_size: int = 64) -> Predictor:
        """Load model and processor from a checkpoint directory or a Hub model id (see `hub.resolve_checkpoint`)."""
        directory = resolve_checkpoint(str(name_or_path))
        model = FusionModel.from_pretrained(directory)
        return cls(model, FusionProcessor.from_pretrained(directory), device, batch_size)

    @property
    def tasks(self) -> list[TaskSpec]:
        return self.model.config.tasks

    def _reader(self, image_root: Path) -> RowReader:
        """A RowReader for {image, text} rows without labels; absent modalities take the placeholder."""
        config = DataConfig(
            image_column=IMAGE, text_column=TEXT, max_image_pixels=self.processor.settings.max_image_pixels
        )
        return RowReader(self.processor, [], config, image_root, "input", allow_missing_modality=True)

    def predict(
        self,
        images: Sequence[ImageInput],
        texts: Sequence[str | None],
        image_root: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> list[dict[str, dict[str, Any]]]:
        """Per input, per task: the prediction (see `describe`). Relative image paths start from `image_root`
        (default: the working directory). Raises BadInputError naming the row for a missing or unreadable image,
        an empty text, or a row with neither image nor text."""
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images but {len(texts)} texts; give one of each per input (or None)")
        # Paths are made absolute here, so the reader's root is the filesystem root and any path is allowed.
        root = Path(image_root or Path.cwd()).absolute()
        reader = self._reader(Path(root.anchor))
        predictions = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
            indices = range(start, min(start + self.batch_size, len(images)))
            rows = [reader.read({IMAGE: _reference(images[i], root, i), TEXT: texts[i]}, i) for i in indices]
            predictions += self.predict_batch(self.collate(rows))
        return predictions

    @torch.no_grad()
    def predict_batch(self, batch: dict) -> list[dict[str, dict[str, Any]]]:
        """One collated batch through the model, described per sample."""
        inputs = {key: value.to(self.device) for key, value in model_inputs(batch).items()}
        output = self.model(**inputs)
        both = (batch["image_present"] & batch["text_present"]).tolist()
        per_task = {spec.name: describe(spec, output, both) for spec in self.tasks}
        return [{name: values[i] for name, values in per_task.items()} for i in range(len(both))]


def _reference(image: ImageInput, root: Path, index: int) -> Image.Image | str | None:
    """What `RowReader.load_image` takes: a PIL image, None, or an absolute path (an empty one is left to its check)."""
    if image is None or isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return str(root / image) if str(image).strip() else str(image)
    raise BadInputError(f"input row {index}: expected an image path or a PIL image, got {type(image).__name__}")


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
