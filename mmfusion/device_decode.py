"""Training images decoded on the accelerator (`--data.cache device`): the loader hands over each JPEG's bytes
(nvJPEG decodes them on a GPU, `torchvision.io.decode_jpeg`), and the crop, flip, resize and normalisation of a
whole batch run there too, so the host only reads files.

Each image goes through the geometry of `FusionProcessor.geometry`: the random crop box and flip drawn from the
same (seed, epoch, index), then the resize and center crop, done as one box-to-square resampling per image
(`torchvision.ops.roi_align`, which averages several samples per output pixel when shrinking). The pixels are close
to the host path's, not identical (another resampling filter), so only training batches take this path; evaluation
decodes on the host and reads the very pixels that `mmfusion evaluate`, the Predictor and exports read. Images that
are not JPEG (nvJPEG decodes only JPEG) are decoded on the host by the loader and join the batch as arrays.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from .processing import FusionProcessor, to_rgb

DEVICE = "device"  # the --data.cache value
JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


class DeviceDecoder:
    """Turns a training batch's `image_sources` (JPEG bytes, uint8 H x W x 3 arrays, or None for rows without an
    image) and `augment_keys` into the `pixel_values` the host path would have made, on `device`."""

    def __init__(self, processor: FusionProcessor, device: torch.device) -> None:
        self.processor, self.device = processor, torch.device(device)
        settings = processor.settings
        self.mean = torch.tensor(settings.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(settings.std, device=self.device).view(1, 3, 1, 1) * 255.0

    def __call__(self, batch: dict) -> dict:
        sources, keys = batch.pop("image_sources"), batch.pop("augment_keys")
        images = self.decode(sources)
        batch["pixel_values"] = self.pixels(images, keys)
        return batch

    def decode(self, sources: list) -> list[torch.Tensor | None]:
        """[3, H, W] uint8 images on the device (None where a row has no image)."""
        images: list[torch.Tensor | None] = [None] * len(sources)
        jpegs = [i for i, source in enumerate(sources) if isinstance(source, bytes)]
        if jpegs:
            encoded = [torch.frombuffer(bytearray(sources[i]), dtype=torch.uint8) for i in jpegs]
            try:
                decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # a JPEG nvJPEG cannot read (CMYK, say): this batch decodes on the host
                decoded = [self._host(np.asarray(to_rgb(Image.open(io.BytesIO(sources[i]))))) for i in jpegs]
            for i, image in zip(jpegs, decoded):
                images[i] = image
        for i, source in enumerate(sources):
            if isinstance(source, np.ndarray):
                images[i] = self._host(source)
        return images

    def _host(self, array: np.ndarray) -> torch.Tensor:
        return (
            torch.from_numpy(np.require(array, requirements=["C", "W"]))
            .permute(2, 0, 1)
            .to(self.device, non_blocking=True)
        )

    def pixels(self, images: list[torch.Tensor | None], keys: list) -> torch.Tensor:
        """Crop, flip, resize and normalise the batch: [N, 3, S, S] float, zeros for rows without an image."""
        size = self.processor.settings.image_size
        present = [i for i, image in enumerate(images) if image is not None]
        out = torch.zeros(len(images), 3, size, size, device=self.device)
        if not present:
            return out
        shapes = [tuple(images[i].shape[-2:]) for i in present]
        height, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
        if len(set(shapes)) == 1:
            stacked = torch.stack([images[i] for i in present]).float()
        else:  # images of several sizes: each in the top-left corner of the largest
            stacked = torch.zeros(len(present), 3, height, width, device=self.device)
            for row, i in enumerate(present):
                stacked[row, :, : shapes[row][0], : shapes[row][1]] = images[i]
        boxes, flips = [], []
        for row, i in enumerate(present):
            box, flip = self.processor.source_box(shapes[row][1], shapes[row][0], keys[i])
            boxes.append((row, *box))
            flips.append(flip)
        boxes = torch.tensor(boxes, dtype=torch.float32, device=self.device)
        crops = roi_align(stacked, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flipped = torch.tensor(flips, device=self.device).view(-1, 1, 1, 1)
        crops = torch.where(flipped, crops.flip(-1), crops)
        out[present] = (crops - self.mean) / self.std
        return out
