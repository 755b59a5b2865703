"""--data.cache device: training JPEGs decoded, cropped and resized by `DeviceDecoder` (here on the CPU, the same
code as on a GPU but for the decoder library), with the host path's geometry; other formats decoded by the loader;
evaluation untouched; training and resume through it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, make_imagefolder, make_rows, train_in_process
from PIL import Image
from safetensors.torch import load_file

from mmfusion.config import Config, DataConfig, FusionConfig, TaskSpec
from mmfusion.device_decode import DeviceDecoder
from mmfusion.prepare import build_splits
from mmfusion.processing import FusionProcessor, ProcessorSettings, train_tokenizer
from mmfusion.rows import Collator

SIZES = [(48, 40), (64, 64), (90, 70), (40, 96), (32, 32)]


def _texture(seed: int, size: tuple[int, int]) -> Image.Image:
    noise = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)


def _jpeg_folder(root: Path, train_rows: int = 10, png_every: int = 0) -> Path:
    """Smooth textures of several sizes stored as JPEG (whatever the file name says); with `png_every`, every such
    row's image stays a PNG."""
    make_imagefolder(root, {"train": make_rows(train_rows), "validation": make_rows(5, 100)})
    for number, path in enumerate(sorted(root.rglob("*.png"))):
        as_png = png_every and number % png_every == 0
        _texture(number, SIZES[number % len(SIZES)]).save(path, format="PNG" if as_png else "JPEG", quality=95)
    return root


def _prepare(data: Path, cache: str | None, **options):
    config = Config(
        model=FusionConfig(image_size=32),
        data=DataConfig(path=str(data), cache=cache, **options),
        tasks=[TaskSpec("label")],
    )
    return build_splits(config)


def _device_batch(dataset, indices: list[int]) -> torch.Tensor:
    batch = Collator(0)(dataset.__getitems__(indices))
    return DeviceDecoder(dataset.reader.processor, torch.device("cpu"))(batch)["pixel_values"]


@pytest.mark.parametrize("png_every", [0, 3])
def test_device_crops_follow_the_host_crops(tmp_path, png_every):
    """The same crop boxes and flips from (seed, epoch, index) as the host path, resampled by another filter: far
    closer to the host's crops than another epoch's crops are; PNG rows (decoded by the loader) likewise."""
    data = _jpeg_folder(tmp_path / "data", png_every=png_every)
    host, device = _prepare(data, None, augment=True).datasets, _prepare(data, "device", augment=True).datasets
    assert device["train"].on_device and not device["validation"].on_device  # evaluation decodes on the host
    rows = list(range(10))
    pixels = {}
    for epoch in (3, 4):
        host["train"].set_epoch(epoch)
        device["train"].set_epoch(epoch)
        pixels[epoch] = ([host["train"][i]["pixel_values"] for i in rows], _device_batch(device["train"], rows))
    hosts, decoded = pixels[3]
    same = np.mean([float((decoded[i] - hosts[i]).abs().mean()) for i in rows])
    other = np.mean([float((pixels[4][1][i] - hosts[i]).abs().mean()) for i in rows])
    assert decoded.shape == (10, 3, 32, 32)
    assert same < 0.25 * other, (same, other)
    for i in rows:  # each row's own crop, not a neighbour's
        others = [float((decoded[i] - hosts[j]).abs().mean()) for j in rows if j != i]
        assert float((decoded[i] - hosts[i]).abs().mean()) < min(others), i


@pytest.mark.parametrize("resize", ["squash", "shortest_edge"])
def test_without_resampling_the_device_pixels_are_the_host_pixels(resize):
    """An image of the model's size with a center crop only (no augmentation), or flipped: a box of whole pixels,
    so the device path reads the host path's very pixels."""
    settings = ProcessorSettings(image_size=32, resize=resize, crop_pct=32 / 40, hflip=True)
    processor = FusionProcessor(train_tokenizer(["picture"]), settings)
    image = _texture(5, (40, 40))
    decoder = DeviceDecoder(processor, torch.device("cpu"))
    array = np.asarray(image)
    assert torch.allclose(decoder.pixels([decoder._host(array)], [None])[0], processor.image_tensor(image), atol=1e-5)
    box, flip = processor.source_box(40, 40, None)
    assert box == (4.0, 4.0, 36.0, 36.0) and not flip


@pytest.mark.parametrize("resize", ["squash", "shortest_edge"])
def test_each_crop_is_flipped_as_on_the_host(resize):
    """With flips on, every key's device crop is nearer the host's crop than the host crop's mirror image (so the
    flip is drawn from the same key and applied to the right box)."""
    settings = ProcessorSettings(image_size=32, resize=resize, crop_pct=0.875, interpolation="bicubic", hflip=True)
    processor = FusionProcessor(train_tokenizer(["picture"]), settings)
    decoder = DeviceDecoder(processor, torch.device("cpu"))
    flips = set()
    for index, size in enumerate([(64, 48), (50, 90), (80, 80), (120, 60)] * 3):
        image, key = _texture(index, size), (0, 1, index)
        host = processor.image_tensor(image, key)
        device = decoder.pixels([decoder._host(np.asarray(image))], [key])[0]
        assert (device - host).abs().mean() < 0.5 * (device - host.flip(-1)).abs().mean(), index
        flips.add(processor.source_box(*size, key)[1])
    assert flips == {True, False}


def test_rows_without_an_image_are_blank_and_the_batch_keeps_its_order(tmp_path):
    data = _jpeg_folder(tmp_path / "data")
    dataset = _prepare(data, "device", augment=True).datasets["train"]
    batch = Collator(0)(dataset.__getitems__([2, 0, 1]))
    batch["image_sources"][1] = None  # as a row with no image (or its image dropped) arrives
    pixels = DeviceDecoder(dataset.reader.processor, torch.device("cpu"))(batch)["pixel_values"]
    assert torch.equal(pixels[1], torch.zeros(3, 32, 32))
    assert torch.equal(pixels[0], _device_batch(dataset, [2])[0]) and torch.equal(
        pixels[2], _device_batch(dataset, [1])[0]
    )


def test_a_batch_the_decoder_refuses_is_decoded_on_the_host(tmp_path, monkeypatch):
    from mmfusion import device_decode

    dataset = _prepare(_jpeg_folder(tmp_path / "data"), "device", augment=True).datasets["train"]
    expected = _device_batch(dataset, [0, 1, 2])

    def refuse(*args, **kwargs):
        raise RuntimeError("nvJPEG: unsupported JPEG")

    monkeypatch.setattr(device_decode, "decode_jpeg", refuse)
    torch.testing.assert_close(_device_batch(dataset, [0, 1, 2]), expected, rtol=0, atol=1e-5)


def test_device_decode_excludes_streams():
    from mmfusion.options import parse_args

    with pytest.raises(SystemExit, match="--data.cache needs map-style data"):
        parse_args(["--data.path", "x", "--data.streaming", "true", "--data.cache", "device"])


def test_training_with_device_decode_and_resuming_it(tmp_path):
    """Training through the device path ends like any run, and a run resumed mid-epoch equals the straight run."""
    data = _jpeg_folder(tmp_path / "data", train_rows=40, png_every=4)
    common = ["--data.path", str(data), *TINY_TRAIN, "--train.max_steps", "6", "--train.eval_every", "6"]
    common += ["--data.cache", "device", "--train.save_every", "3", "--train.log_every", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_in_process([*common, "--train.output_dir", str(straight)]) == 0
    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    assert train_in_process([*common, "--train.output_dir", str(resumed), "--train.resume", "latest"]) == 0
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    plain = tmp_path / "plain"  # the host path trains other weights: the device path is really taken
    assert train_in_process([*common[:-6], "--train.log_every", "1", "--train.output_dir", str(plain)]) == 0
    c = load_file(plain / "final" / "model.safetensors")
    assert not all(torch.equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize(
    ("free_gib", "cuda", "image_size", "train", "others"),
    [
        (100, True, 224, "auto", "auto"),  # fits: stored, the fastest
        (0.01, True, 224, "device", None),  # does not fit, a GPU, pretrained-size input: device decoding
        (0.01, True, 64, None, None),  # a small model: host decoding was faster than device decoding
        (0.01, False, 224, None, None),  # no GPU
    ],
)
def test_auto_stores_the_images_when_they_fit_else_decodes_where_it_was_faster(
    monkeypatch, tmp_path, free_gib, cuda, image_size, train, others
):
    import shutil as shutil_module

    from mmfusion import image_cache

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setattr(image_cache.datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    usage = shutil_module.disk_usage(tmp_path)._replace(free=int(free_gib * 2**30))
    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda path: usage)
    processor = FusionProcessor(train_tokenizer(["picture"]), ProcessorSettings(image_size=image_size))
    rows = {"train": 3000, "validation": 500}
    chosen, note = image_cache.resolve_auto("auto", rows, processor, cuda)
    assert chosen == {"train": train, "validation": others}
    assert bool(note) == (free_gib < 1)
    assert image_cache.resolve_auto("/my/cache", rows, processor, cuda) == (dict.fromkeys(rows, "/my/cache"), "")
