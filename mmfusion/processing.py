"""FusionProcessor: turns raw images, texts and labels into model inputs, and saves beside a checkpoint.

Images: any PIL mode to RGB, resize, (training) a random crop whose randomness derives only from
(seed, epoch, index), normalisation. Texts: a `tokenizers.Tokenizer` - the Hugging Face model's own for `hf`
encoders, or a word-level/BPE tokenizer trained on the training text. Labels: each task's label map (dense tasks'
masks go through the image's own `geometry` in masks.py).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from .config import TaskSpec
from .errors import BadInputError, CheckpointError

PROCESSOR_NAME = "processor.json"
TOKENIZER_NAME = "tokenizer.json"
PAD, UNK = "[PAD]", "[UNK]"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ProcessorSettings:
    """Everything `processor.json` stores. Images: resize (`squash` to a square, or the `shortest_edge` keeping
    the aspect ratio) to image_size / crop_pct, then crop the center image_size square (timm's and the Hugging Face
    image processors' evaluation transform)."""

    image_size: int = 64
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = False
    max_text_length: int = 64
    pad_id: int = 0
    max_image_pixels: int = 50_000_000
    # How the training data was read (DataConfig), so evaluation and prediction read rows the same way; a checkpoint
    # written before these were stored gets today's defaults.
    image_column: str = "image"
    text_column: str = "caption"
    image_root: str | None = None
    missing_modality: str = "error"
    interpolation: str = "bilinear"  # a PIL resampling filter, lower case
    resize: str = "squash"  # or "shortest_edge"
    crop_pct: float = 1.0
    pad_to_max_length: bool = False  # texts padded to max_text_length (SigLIP's text tower reads the last position)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK, ...) as 8-bit RGB; transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / high * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_file(source: Any, where: str, kind: str = "image") -> Image.Image:
    """`Image.open` of a path or bytes (not decoded yet), its errors as BadInputError naming the `kind` of file."""
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError:
        raise BadInputError(f"{where}: {kind} file not found: {source}") from None
    except PermissionError:
        raise BadInputError(f"{where}: {kind} file is not readable (permission denied): {source}") from None
    except (OSError, Image.DecompressionBombError, ValueError) as error:
        raise BadInputError(f"{where}: not a readable {kind} ({error})") from None


def path_of(value: Any) -> str | None:
    """The path an image value names (a path string, or a {'bytes': None, 'path': ...} dict); None otherwise."""
    if isinstance(value, dict) and value.get("bytes") is None:
        value = value.get("path")
    return value if isinstance(value, str) and value.strip() else None


def open_image(source: Any, max_pixels: int, where: str) -> Image.Image:
    """Open and fully decode an image from a path, bytes, a {'bytes', 'path'} dict or a PIL image."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, dict):
            source = source.get("bytes") or source.get("path")
        image = open_file(source, where)
    width, height = image.size
    if width * height > max_pixels:
        raise BadInputError(
            f"{where}: image of {width}x{height} pixels exceeds data.max_image_pixels={max_pixels} "
            "(possible decompression bomb)"
        )
    if width == 0 or height == 0:
        raise BadInputError(f"{where}: image is empty ({width}x{height})")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise BadInputError(f"{where}: image is corrupt or truncated ({error})") from None
    return to_rgb(image)


def as_number(value: Any) -> float | None:
    """A regression target as float: numbers, and strings that spell one (CSV columns arrive as text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def train_tokenizer(texts: Iterable[str], kind: str = "wordlevel", vocab_size: int = 8000) -> Tokenizer:
    """A lower-casing word-level or BPE tokenizer trained on `texts`; [PAD] is id 0 and [UNK] id 1."""
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False)
    elif kind == "wordlevel":
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer {kind!r}; choose wordlevel or bpe")
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def hf_tokenizer(model_path: str) -> tuple[Tokenizer, int]:
    """The fast tokenizer of a Hugging Face model (local path or cache) as a `tokenizers.Tokenizer`, and its pad id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{model_path}: its tokenizer ({type(tokenizer).__name__}) has no `tokenizers` version (tokenizer.json), "
            "which the processor saves beside checkpoints"
        )
    return backend, tokenizer.pad_token_id or 0


class FusionProcessor:
    """Images, texts and labels in; padded tensors out. `save_pretrained`/`from_pretrained` like the model."""

    def __init__(self, tokenizer: Tokenizer, settings: ProcessorSettings | None = None) -> None:
        self.settings = settings or ProcessorSettings()
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.settings.max_text_length)
        self._label_index: dict[tuple[str, ...], dict[str, int]] = {}
        self.truncated = 0  # texts cut to max_text_length so far

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    # ----- images -----

    def crop_box(self, width: int, height: int, seed: int, epoch: int, index: int) -> tuple[int, int, int, int]:
        """Random crop (scale and position) drawn from a generator seeded by (seed, epoch, index) only."""
        generator = np.random.default_rng([seed, epoch, index])
        low, high = self.settings.crop_scale
        side = math.sqrt(generator.uniform(low, high))
        crop_w, crop_h = max(1, round(width * side)), max(1, round(height * side))
        left = int(generator.integers(0, width - crop_w + 1))
        top = int(generator.integers(0, height - crop_h + 1))
        return left, top, left + crop_w, top + crop_h

    def cache_side(self, augment: bool) -> int:
        """The side of the image cache's squares: image_size for evaluation (the very pixels of the uncached path);
        for training so much more that the smallest random crop of an image shrunk to fit, resized as `resize`
        resizes it, is never enlarged."""
        size = self.settings.image_size
        if not augment:
            return size
        return math.ceil(size / self.settings.crop_pct / math.sqrt(self.settings.crop_scale[0]))

    def cache_pixels(self, image: Image.Image, augment: bool) -> np.ndarray:
        """What the image cache stores of `image`: the evaluation pixels, or for training the whole image in the
        top-left corner of a `cache_side(True)` square, each side shrunk to fit (`cached_size`) and never enlarged,
        from which the training crops are cut."""
        if not augment:
            return np.asarray(self.resize(image), dtype=np.uint8)
        side = self.cache_side(True)
        width, height = self.cached_size(image.size)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling[self.settings.interpolation.upper()])
        square = np.zeros((side, side, 3), dtype=np.uint8)
        square[:height, :width] = np.asarray(image, dtype=np.uint8)
        return square

    def cached_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) the image cache stores a training image of `size` at: each side at most
        `cache_side(True)`. An image that fits is stored as it is, so its crops are the uncached path's pixels."""
        side = self.cache_side(True)
        return min(size[0], side), min(size[1], side)

    def geometry(
        self, image: Image.Image, augment_key: tuple[int, int, int] | None = None, resample: str | None = None
    ) -> Image.Image:
        """The image's crop, flip and resize: with `augment_key` = (seed, epoch, index) the random crop and flip
        drawn from it, then `resize`. Masks go through the same steps with `resample="nearest"`."""
        if augment_key is not None:
            image = image.crop(self.crop_box(*image.size, *augment_key))
            if self._flips(augment_key):
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.resize(image, resample=resample)

    def image_tensor(
        self,
        image: Image.Image | np.ndarray,
        augment_key: tuple[int, int, int] | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """RGB PIL image -> normalised [3, S, S]; `augment_key` = (seed, epoch, index) enables the random crop (and
        flip). From the image cache: the stored uint8 array, and `size`, the original image's (width, height)."""
        if isinstance(image, np.ndarray):
            return self.normalise(image if augment_key is None else self._cached_crop(image, augment_key, size))
        return self.normalise(self.geometry(image, augment_key))

    def _flips(self, augment_key: tuple[int, int, int]) -> bool:
        return self.settings.hflip and np.random.default_rng([*augment_key, 1]).random() < 0.5

    def _cached_crop(self, array: np.ndarray, augment_key: tuple[int, int, int], size: tuple[int, int]):
        """A training crop from the cache's square: the box and flip drawn as on the original image, cut from the
        stored image, then resized as `resize` resizes a crop of the original (whose size `size` gives)."""
        width, height = size
        stored_width, stored_height = self.cached_size(size)
        left, top, right, bottom = self.crop_box(stored_width, stored_height, *augment_key)
        crop = array[top:bottom, left:right]
        if self._flips(augment_key):
            crop = crop[:, ::-1]
        like = (round((right - left) * width / stored_width), round((bottom - top) * height / stored_height))
        return self.resize(Image.fromarray(np.ascontiguousarray(crop)), like)

    def normalise(self, pixels: Image.Image | np.ndarray) -> torch.Tensor:
        """uint8 RGB pixels (H x W x 3) -> float [3, H, W], normalised by the mean and std."""
        array = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.settings.mean).view(3, 1, 1)
        std = torch.tensor(self.settings.std).view(3, 1, 1)
        return (array - mean) / std

    def picture(self, pixel_values: torch.Tensor) -> np.ndarray:
        """The inverse of `image_tensor`'s normalisation: [3, S, S] -> [S, S, 3] RGB in [0, 1], for figures."""
        mean = torch.tensor(self.settings.mean).view(3, 1, 1)
        std = torch.tensor(self.settings.std).view(3, 1, 1)
        return (pixel_values.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    def resize(
        self, image: Image.Image, like: tuple[int, int] | None = None, resample: str | None = None
    ) -> Image.Image:
        """Resize (squashed, or by the shortest edge) to image_size / crop_pct with the `resample` filter (default:
        the settings' interpolation), then crop the center square. `like`: the (width, height) whose aspect a
        shortest-edge resize keeps, when `image` stands for an image of another shape (a crop of the image cache's
        squashed square stands for a crop of the original)."""
        size = self.settings.image_size
        target = self.resize_target(*(like or image.size))
        if image.size != target:
            image = image.resize(target, Image.Resampling[(resample or self.settings.interpolation).upper()])
        if image.size != (size, size):
            left, top = round((image.width - size) / 2), round((image.height - size) / 2)
            image = image.crop((left, top, left + size, top + size))
        return image

    def resize_target(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) `resize` resizes an image of this size to, before the center crop."""
        scaled = math.floor(self.settings.image_size / self.settings.crop_pct + 1e-6)
        if self.settings.resize != "shortest_edge":
            return scaled, scaled
        short, long = min(width, height), max(width, height)
        other = int(scaled * long / short)
        return (scaled, other) if width <= height else (other, scaled)

    def source_box(
        self, width: int, height: int, augment_key: tuple[int, int, int] | None
    ) -> tuple[tuple[float, float, float, float], bool]:
        """The region of a width x height image that `geometry` turns into the image_size square (the crop drawn
        from `augment_key`, then the resize's center crop, in the image's continuous coordinates), and whether it
        is flipped: the host path's geometry as one box, for resampling on the device."""
        left, top, right, bottom = (
            (0, 0, width, height) if augment_key is None else self.crop_box(width, height, *augment_key)
        )
        crop_width, crop_height = right - left, bottom - top
        target_width, target_height = self.resize_target(crop_width, crop_height)
        size = self.settings.image_size
        x, y = round((target_width - size) / 2), round((target_height - size) / 2)
        flip = augment_key is not None and self._flips(augment_key)
        x = target_width - size - x if flip else x  # the host path crops the center of the flipped image
        scale_x, scale_y = crop_width / target_width, crop_height / target_height
        box = (left + x * scale_x, top + y * scale_y, left + (x + size) * scale_x, top + (y + size) * scale_y)
        return box, flip

    def blank_image(self) -> torch.Tensor:
        return torch.zeros(3, self.settings.image_size, self.settings.image_size)

    # ----- texts -----

    def encode_text(self, text: str) -> list[int]:
        encoding = self.tokenizer.encode(text)
        if encoding.overflowing:
            self.truncated += 1
        ids = encoding.ids or [self.settings.pad_id]
        if self.settings.pad_to_max_length:
            ids = ids + [self.settings.pad_id] * (self.settings.max_text_length - len(ids))
        return ids

    # ----- labels -----

    def encode_label(self, spec: TaskSpec, value: Any, where: str) -> tuple[torch.Tensor, bool]:
        """(target tensor, has label); None means the row has no label for this task."""
        if spec.type == "multilabel":
            target = torch.zeros(spec.num_labels)
            if value is None:
                return target, False
            if not isinstance(value, (list, tuple)):
                raise BadInputError(
                    f"{where}: expected a list of labels for multilabel task {spec.name!r}, got {value!r}"
                )
            for item in value:
                target[self._class_index(spec, item, where)] = 1.0
            return target, True
        if spec.type == "regression":
            if value is None:
                return torch.tensor(float("nan")), False
            number = as_number(value)
            if number is None:
                raise BadInputError(f"{where}: expected a number for regression task {spec.name!r}, got {value!r}")
            if not math.isfinite(number):
                raise BadInputError(f"{where}: regression target for task {spec.name!r} is not finite ({value!r})")
            return torch.tensor(number), True
        if spec.type == "matching":
            if value is None:
                return torch.tensor(1), True  # no column: every row is a true pair
            return torch.tensor(int(bool(value))), bool(value)
        if value is None:
            return torch.tensor(-1), False
        return torch.tensor(self._class_index(spec, value, where)), True

    def _class_index(self, spec: TaskSpec, value: Any, where: str) -> int:
        if isinstance(value, (float, list, dict)):
            raise BadInputError(
                f"{where}: expected a class label (string, int or bool) for task {spec.name!r}, got {value!r}"
            )
        labels = tuple(spec.labels or ())
        if labels not in self._label_index:
            self._label_index[labels] = {name: i for i, name in enumerate(labels)}
        index = self._label_index[labels].get(str(value))
        if index is None:
            known = list(labels)
            raise BadInputError(
                f"{where}: label {value!r} of task {spec.name!r} was not seen in training; known labels: {known[:20]}"
            )
        return index

    # ----- save / load -----

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROCESSOR_NAME).write_text(json.dumps(asdict(self.settings), indent=2))
        self.tokenizer.save(str(directory / TOKENIZER_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> FusionProcessor:
        """Load processor.json and tokenizer.json from a checkpoint directory or Hugging Face Hub model id."""
        from .hub import resolve_checkpoint

        directory = resolve_checkpoint(str(directory))
        for name in (PROCESSOR_NAME, TOKENIZER_NAME):
            if not (directory / name).is_file():
                raise CheckpointError(f"processor file missing: {directory / name}")
        try:
            values = json.loads((directory / PROCESSOR_NAME).read_text())
            settings = ProcessorSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except (json.JSONDecodeError, TypeError) as error:
            raise CheckpointError(f"{directory / PROCESSOR_NAME} is not a valid processor file: {error}") from None
        try:
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_NAME))
        except Exception as error:  # tokenizers raises a plain Exception for bad files
            raise CheckpointError(f"{directory / TOKENIZER_NAME} is not a valid tokenizer file: {error}") from None
        return cls(tokenizer, settings)
