"""Frozen-encoder feature cache: the encoders run once per row, their outputs are stored on disk, and training
runs only the fusion and the heads.

A split's cache is one safetensors file, `$MMFUSION_CACHE/features/<key>.safetensors` (default ~/.cache/mmfusion),
whose key hashes everything its values depend on: the split's rows (the `datasets` fingerprint, the image root and
columns), the processor (image and text settings, tokenizer) and the encoders' weights. It holds each row's pooled
vectors and, when the fusion reads them (film, cross_attention), its token features and masks. Rows are encoded as
evaluation sees them: no augmentation (images referenced by path are not re-read, so the key does not follow edits
to image files in place).

Integration: `wanted(...)` decides; `cached_dataset(model, dataset, ...)` wraps a `FusionDataset` (labels, row
checks, modality dropout and `describe` still come from it) and `FeatureCollator` batches it; the batches carry
`features`, which `FusionModel.forward` takes instead of pixels and token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .data import ROW_COLUMN
from .model import FusionModel
from .rows import Collator, FusionDataset, presence

MODALITIES = ("image", "text")


def cache_root() -> Path:
    return Path(os.environ.get("MMFUSION_CACHE") or Path.home() / ".cache" / "mmfusion") / "features"


def wanted(setting: bool | None, model: FusionModel, streaming: bool) -> bool:
    """`--train.cache_features`: true, false, or (unset) on when no encoder parameter trains and the data is not
    a stream."""
    if setting is not None:
        return setting
    encoders = [*model.image_encoder.parameters(), *model.text_encoder.parameters()]
    return not streaming and not any(p.requires_grad for p in encoders)


def reads_tokens(model: FusionModel) -> bool:
    """Whether the fusion reads token features (else pooled vectors are all the cache needs to hold)."""
    return getattr(model.fusion, "reads_tokens", True)


def weights_digest(model: FusionModel) -> str:
    """SHA-256 of the encoders' weights (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for prefix, encoder in (("image", model.image_encoder), ("text", model.text_encoder)):
        for name, tensor in encoder.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{prefix}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(model: FusionModel, dataset: FusionDataset) -> str:
    """What the cached values depend on, hashed: the rows, the processor and the encoders."""
    reader, processor = dataset.reader, dataset.reader.processor
    parts = {
        "rows": dataset.split._fingerprint,
        "split": reader.split,
        "root": str(Path(reader.root).resolve()),
        "columns": [reader.config.image_column, reader.config.text_column],
        "processor": asdict(processor.settings),
        "tokenizer": hashlib.sha256(processor.tokenizer.to_str().encode()).hexdigest(),
        "encoders": weights_digest(model),
        "tokens": reads_tokens(model),
        "mmfusion": __version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@torch.no_grad()
def compute_features(model: FusionModel, dataset: FusionDataset, batch_size: int, tokens: bool) -> dict:
    """Every row's encoder outputs, in row order (no augmentation, no modality dropout), as named CPU tensors."""
    plain = FusionDataset(dataset.split, dataset.reader)
    loader = torch.utils.data.DataLoader(
        plain, batch_size, collate_fn=Collator(dataset.reader.processor.settings.pad_id)
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        outputs = model.encoder_outputs(*(batch[k].to(device) for k in ("pixel_values", "input_ids", "attention_mask")))
        for name, output in outputs.items():
            values = {"pooled": output.pooled}
            if tokens:
                values.update(tokens=output.tokens, mask=output.mask)
            for field, tensor in values.items():
                parts.setdefault(f"{name}.{field}", []).append(
                    tensor.float().cpu() if field != "mask" else tensor.cpu()
                )
    model.train(was_training)
    return {
        key: torch.cat(_padded(chunks) if key.endswith((".tokens", ".mask")) else chunks)
        for key, chunks in parts.items()
    }


def _padded(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Batches of token features (or masks) padded with zeros (False) to the longest sequence of all of them."""
    length = max(chunk.shape[1] for chunk in chunks)
    padded = []
    for chunk in chunks:
        full = chunk.new_zeros((chunk.shape[0], length, *chunk.shape[2:]))
        full[:, : chunk.shape[1]] = chunk
        padded.append(full)
    return padded


class CachedFeatures(torch.utils.data.Dataset):
    """A `FusionDataset` whose images and texts are replaced by their cached encoder outputs; row checks, labels,
    modality dropout and `describe` still come from it (without decoding any image)."""

    def __init__(self, dataset: FusionDataset, path: Path) -> None:
        self.dataset, self.path = dataset, path
        self._file = None  # opened lazily, once per process (loader workers open their own)
        with safe_open(str(path), framework="pt") as file:
            self.keys = list(file.keys())
            rows = file.get_slice("image.pooled").get_shape()[0]
        if rows != len(dataset):
            raise ValueError(f"{path}: {rows} cached rows for a split of {len(dataset)}")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def describe(self, number: int) -> str:
        return self.dataset.describe(number)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        dataset, index = self.dataset, int(index)
        if self._file is None:
            self._file = safe_open(str(self.path), framework="pt")
        row = dataset.split[index]
        number = row.get(ROW_COLUMN, index)
        image, text, labels, masks = dataset.reader.parse(row, number, decode_image=False)
        image_present, text_present = presence(
            image is not None, text is not None, dataset.modality_dropout, dataset.seed, dataset.epoch, number
        )
        return {
            "row": number,
            "features": {key: self._file.get_slice(key)[index] for key in self.keys},
            "image_present": image_present,
            "text_present": text_present,
            "labels": labels,
            "label_mask": masks,
        }


class FeatureCollator:
    """Stacks cached rows into a batch whose `features` FusionModel.forward reads; texts are cut to the longest
    present text of the batch (as `Collator` pads them). Without cached tokens, each pooled vector is its
    modality's one token."""

    def __call__(self, rows: list[dict]) -> dict:
        text_present = torch.tensor([row["text_present"] for row in rows])
        features = {}
        for name in MODALITIES:
            pooled = torch.stack([row["features"][f"{name}.pooled"] for row in rows])
            if f"{name}.tokens" in rows[0]["features"]:
                tokens = torch.stack([row["features"][f"{name}.tokens"] for row in rows])
                mask = torch.stack([row["features"][f"{name}.mask"] for row in rows])
                if name == "text":
                    length = int(torch.where(text_present, mask.sum(1), 1).max())
                    tokens, mask = tokens[:, :length], mask[:, :length]
            else:
                tokens, mask = pooled.unsqueeze(1), torch.ones(len(rows), 1, dtype=torch.bool)
            features[name] = {"pooled": pooled, "tokens": tokens, "mask": mask}
        tasks = rows[0]["labels"].keys()
        return {
            "features": features,
            "image_present": torch.tensor([row["image_present"] for row in rows]),
            "text_present": text_present,
            "labels": {task: torch.stack([row["labels"][task] for row in rows]) for task in tasks},
            "label_mask": {task: torch.tensor([row["label_mask"][task] for row in rows]) for task in tasks},
            "row": torch.tensor([row["row"] for row in rows]),
        }


def cached_dataset(
    model: FusionModel, dataset: FusionDataset, accelerator=None, batch_size: int = 64
) -> tuple[CachedFeatures, str]:
    """`dataset` backed by its feature cache, built first when missing (by the main process; the others wait).
    Returns the dataset and a line saying what was done."""
    path = cache_root() / f"{cache_key(model, dataset)}.safetensors"
    start = time.perf_counter()
    built = not path.is_file()
    is_main = accelerator is None or accelerator.is_main_process
    if built and is_main:
        features = compute_features(model, dataset, batch_size, reads_tokens(model))
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(features, str(staging), metadata={"mmfusion_version": __version__})
        os.replace(staging, path)  # atomic: a crash never leaves a half-written cache behind
    if accelerator is not None:
        accelerator.wait_for_everyone()
    action = f"built in {time.perf_counter() - start:.1f}s" if built else "reused"
    return CachedFeatures(dataset, path), f"{dataset.reader.split}: {len(dataset):,} rows, {action} ({path})"
