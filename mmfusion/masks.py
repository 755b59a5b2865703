"""Masks of dense tasks: reading them, checking them against their image and task, putting them through the
image's own crop, flip and resize (nearest neighbour), and writing predicted masks as PNGs and overlays.

Formats. segmentation: a single-channel (L, I;16, I, 1) or palette (P) image whose pixel values are class ids
0..num_labels-1, `ignore_index` (255) for unlabelled pixels; a palette PNG's colours are only for viewing.
dense_regression: a single-channel image (16-bit I;16, 32-bit I or F, 8-bit L) or a 2-D .npy array; the stored
value times `value_scale` is the target, and `invalid_value` and non-finite values mark unlabelled pixels. A mask
has its image's size; a missing one (null) leaves the row unlabelled for its task.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import TaskSpec
from .errors import BadInputError
from .processing import FusionProcessor, open_file

CLASS_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")
VALUE_MODES = ("L", "I", "F", "I;16", "I;16B", "I;16L")
NPY_MAGIC = b"\x93NUMPY"


def read_mask(spec: TaskSpec, source: Any, where: str, image_size: tuple[int, int] | None) -> np.ndarray:
    """The stored mask as a 2-D array, checked: readable, in a mode the task takes, of its image's (width, height)
    (`image_size`; None: not checked) and, for segmentation, with known class ids. `source` is a path, bytes, a PIL
    image or an array."""
    if isinstance(source, (np.ndarray, list)):
        array = np.asarray(source)
    elif isinstance(source, Path) and source.suffix == ".npy" or isinstance(source, bytes) and source[:6] == NPY_MAGIC:
        array = _load_npy(source, where)
    else:
        image = source if isinstance(source, Image.Image) else open_file(source, where, kind="mask")
        array = _image_array(spec, image, where, image_size)
    if array.ndim != 2:
        raise BadInputError(f"{where}: expected a 2-D mask, got an array of shape {array.shape}")
    if image_size is not None and array.shape[::-1] != tuple(image_size):
        width, height = image_size
        raise BadInputError(
            f"{where}: mask of {array.shape[1]}x{array.shape[0]} pixels does not match its image of {width}x{height}"
        )
    if spec.type == "segmentation":
        _check_class_ids(spec, array, where)
    elif not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise BadInputError(f"{where}: expected numeric mask values, got {array.dtype}")
    return array


def _load_npy(source: Path | bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False)
    except FileNotFoundError:
        raise BadInputError(f"{where}: mask file not found: {source}") from None
    except PermissionError:
        raise BadInputError(f"{where}: mask file is not readable (permission denied): {source}") from None
    except (OSError, ValueError) as error:
        raise BadInputError(f"{where}: not a readable mask (.npy: {error})") from None


def _image_array(spec: TaskSpec, image: Image.Image, where: str, image_size: tuple[int, int] | None) -> np.ndarray:
    """The pixel values of a mask image (its size is checked before its pixels are decoded)."""
    modes = CLASS_MODES if spec.type == "segmentation" else VALUE_MODES
    if image.mode not in modes:
        kind = "class ids (single-channel or palette)" if spec.type == "segmentation" else "values (single-channel)"
        raise BadInputError(f"{where}: expected a mask image of {kind}, got a {image.mode} image")
    if image_size is not None and image.size != tuple(image_size):
        raise BadInputError(
            f"{where}: mask of {image.width}x{image.height} pixels does not match its image of "
            f"{image_size[0]}x{image_size[1]}"
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise BadInputError(f"{where}: mask is corrupt or truncated ({error})") from None
    return np.asarray(image)


def _check_class_ids(spec: TaskSpec, array: np.ndarray, where: str) -> None:
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise BadInputError(f"{where}: expected integer class ids in the mask, got {array.dtype} values")
    ids = np.unique(array)
    bad = [int(i) for i in ids if not (0 <= i < spec.num_labels or i == spec.ignore_index)]
    if bad:
        raise BadInputError(
            f"{where}: class ids {bad[:10]} out of range for task {spec.name!r} (ids 0..{spec.num_labels - 1}, "
            f"{spec.ignore_index} for unlabelled pixels)"
        )


def stored_values(spec: TaskSpec, mask: np.ndarray) -> np.ndarray:
    """A dense_regression mask's targets: stored values times `value_scale`, NaN where unlabelled (float32)."""
    values = mask.astype(np.float32) * np.float32(spec.value_scale)
    if spec.invalid_value is not None:
        values[mask == spec.invalid_value] = np.nan
    return np.where(np.isfinite(values), values, np.float32(np.nan)).astype(np.float32)


def mask_target(
    processor: FusionProcessor, spec: TaskSpec, mask: np.ndarray | None, augment_key: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, bool]:
    """(target, has label) of a dense task: the checked mask through `processor`'s geometry with nearest-neighbour
    resampling (the same crop and flip as its image for the same `augment_key`), at the task's output size.
    segmentation: class ids [S, S] (long); dense_regression: values [S, S] (float32, NaN where unlabelled)."""
    side = processor.settings.image_size // spec.output_stride
    if mask is None:
        fill = spec.ignore_index if spec.type == "segmentation" else float("nan")
        dtype = torch.long if spec.type == "segmentation" else torch.float32
        return torch.full((side, side), fill, dtype=dtype), False
    if spec.type == "segmentation":
        image = Image.fromarray(mask.astype(np.int32))
    else:
        image = Image.fromarray(stored_values(spec, mask))
    image = processor.geometry(image, augment_key, resample="nearest")
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.NEAREST)
    target = torch.from_numpy(np.array(image))
    return (target.long(), True) if spec.type == "segmentation" else (target.float(), True)


# ----- predicted masks as pictures -----


def class_colours(count: int) -> np.ndarray:
    """[count, 3] uint8 colours of class ids (tab20, repeated), the same in PNGs, overlays and the report."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"].colors
    return (np.array([palette[(2 * i) % 20 + (2 * i) // 20 % 2] for i in range(count)]) * 255).round().astype(np.uint8)


def colourise(spec: TaskSpec, values: np.ndarray) -> np.ndarray:
    """A mask as [H, W, 3] uint8 RGB: class colours (unlabelled pixels white), or values on the viridis scale
    between their minimum and maximum (unlabelled pixels white)."""
    if spec.type == "segmentation":
        colours = np.vstack([class_colours(spec.num_labels), [[255, 255, 255]]])
        return colours[np.where(values < spec.num_labels, values, spec.num_labels)]
    import matplotlib

    finite = np.isfinite(values)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 1.0)
    scaled = np.where(finite, (values - low) / max(high - low, 1e-12), 0.0)
    rgb = (matplotlib.colormaps["viridis"](scaled)[..., :3] * 255).round().astype(np.uint8)
    return np.where(finite[..., None], rgb, 255).astype(np.uint8)


def overlay(picture: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`colours` [H, W, 3] blended over `picture` (uint8 RGB, resized to the mask's size by nearest neighbour)."""
    image = Image.fromarray(picture).resize(colours.shape[1::-1], Image.Resampling.NEAREST)
    return (np.asarray(image) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def write_mask(spec: TaskSpec, values: np.ndarray, path: Path) -> Path:
    """A predicted mask in the task's own format: segmentation a palette PNG of class ids (16-bit single-channel
    PNG beyond 256 classes); dense_regression a .npy array of the values (`path` with that suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.type == "dense_regression":
        path = path.with_suffix(".npy")
        np.save(path, values.astype(np.float32))
        return path
    if spec.num_labels > 256:
        Image.fromarray(values.astype(np.uint16)).save(path)
        return path
    image = Image.frombytes("P", values.shape[::-1], np.ascontiguousarray(values, dtype=np.uint8).tobytes())
    image.putpalette(class_colours(spec.num_labels).flatten().tolist())
    image.save(path)
    return path


def save_prediction(spec: TaskSpec, result: dict, picture: np.ndarray | None, stem: Path) -> dict:
    """Write one dense prediction (`Predictor.describe`) beside `stem`: the mask (`write_mask`: stem.png, or
    stem.npy for values) and its colours over the input as the model saw it (`picture`, uint8 RGB; without an
    image the colours alone) as stem_overlay.png. Returns the prediction with the files' paths in place of arrays."""
    values = result["mask"] if spec.type == "segmentation" else result["values"]
    colours = colourise(spec, values)
    written = write_mask(spec, values, stem.with_suffix(".png"))
    shown = colours if picture is None else overlay(picture, colours)
    overlay_path = stem.with_name(f"{stem.name}_overlay.png")
    Image.fromarray(shown).save(overlay_path)
    described = {key: value for key, value in result.items() if key not in ("mask", "values")}
    return {
        "mask" if spec.type == "segmentation" else "values": str(written),
        "overlay": str(overlay_path),
        **described,
    }
