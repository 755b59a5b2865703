"""The decoded-image cache: the same evaluation pixels as decoding, training crops from stored arrays, invalidation
when the data or the settings change, bad images reported as without it, and training and resume through it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN, make_imagefolder, make_rows, train_in_process
from PIL import Image
from safetensors.torch import load_file

from mmfusion.config import Config, DataConfig, FusionConfig, TaskSpec
from mmfusion.prepare import build_splits
from mmfusion.processing import FusionProcessor, ProcessorSettings, to_rgb, train_tokenizer

SIZES_AND_MODES = [((40, 30), "RGB"), ((64, 64), "RGBA"), ((100, 80), "L"), ((33, 90), "P"), ((32, 32), "RGB")]


def _noisy_imagefolder(root: Path, train_rows: int = 10) -> Path:
    """Smooth random textures of several sizes and modes, so that resizing and cropping show in every pixel."""
    make_imagefolder(root, {"train": make_rows(train_rows), "validation": make_rows(5, 100)})
    for number, path in enumerate(sorted(root.rglob("*.png"))):
        size, mode = SIZES_AND_MODES[number % len(SIZES_AND_MODES)]
        noise = np.random.default_rng(number).integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC).convert(mode).save(path)
    return root


def _prepare(data: Path, cache: Path | None, image_size: int = 32, **options):
    config = Config(
        model=FusionConfig(image_size=image_size),
        data=DataConfig(path=str(data), cache=str(cache) if cache else None, **options),
        tasks=[TaskSpec("label")],
    )
    return build_splits(config)


def _entries(cache: Path) -> dict[str, float]:
    """Complete cache entries and when their index was written."""
    return {p.parent.name: p.stat().st_mtime_ns for p in cache.glob("*/index.json")}


def test_evaluation_pixels_are_the_uncached_pixels_bit_for_bit_and_training_crops_stay_close(tmp_path):
    data = _noisy_imagefolder(tmp_path / "data")
    plain, cached = _prepare(data, None, augment=True), _prepare(data, tmp_path / "cache", augment=True)
    validation = plain.datasets["validation"], cached.datasets["validation"]
    assert cached.datasets["validation"].images is not None
    for index in range(len(validation[0])):
        assert torch.equal(validation[0][index]["pixel_values"], validation[1][index]["pixel_values"]), index

    train_plain, train_cached = plain.datasets["train"], cached.datasets["train"]
    assert train_cached.images.side == 36  # ceil(32 / sqrt(0.8)): the smallest crop still covers 32 pixels
    crops = {}
    for epoch in (3, 4):
        for dataset in (train_plain, train_cached):
            dataset.set_epoch(epoch)
        crops[epoch] = [(train_plain[i]["pixel_values"], train_cached[i]["pixel_values"]) for i in range(10)]
    train_cached.set_epoch(3)
    for index, (_, pixels) in enumerate(crops[3]):
        assert torch.equal(pixels, train_cached[index]["pixel_values"])  # drawn from (seed, epoch, index) only
    fitting = [i for i in range(10) if max(train_cached.images.image(i)[1]) <= 36]
    assert fitting  # the 32 x 32 images are stored as they are: their crops are the uncached crops bit for bit
    for index in fitting:
        assert torch.equal(crops[3][index][0], crops[3][index][1]), index
    # Larger images: the same crop boxes and flips as decoding, up to resampling twice and boxes rounded on the
    # stored grid: far closer to the uncached crops than another epoch's crops are.
    same = np.mean([float((cached - plain).abs().mean()) for plain, cached in crops[3]])
    other = np.mean([float((cached - plain).abs().mean()) for (plain, _), (_, cached) in zip(crops[3], crops[4])])
    assert same < 0.4 * other, (same, other)


def test_training_rows_keep_their_evaluation_pixels_with_augment_off(tmp_path):
    """data.augment false, or crops that keep the whole area (data.crop_area 1): every epoch trains on the very
    pixels evaluation reads (no crop that enlarges the picture or cuts off its border), as by default; with augment
    true each epoch's random crops differ from them."""
    data = _noisy_imagefolder(tmp_path / "data")
    for options, cropped in (({}, False), ({"augment": True, "crop_area": 1.0}, False), ({"augment": True}, True)):
        train = _prepare(data, None, **options).datasets["train"]
        images = [train.reader.image(row["image"], i) for i, row in enumerate(train.split)]
        evaluation = [train.reader.processor.image_tensor(to_rgb(image)) for image in images]
        for epoch in (0, 3):
            train.set_epoch(epoch)
            same = [torch.equal(train[i]["pixel_values"], pixels) for i, pixels in enumerate(evaluation)]
            # a crop of 97-100 % of a side can round to the whole image: most rows, not all, are cropped
            assert all(same) if not cropped else sum(same) < len(same) / 2, (options, epoch, same)


@pytest.mark.parametrize("resize", ["squash", "shortest_edge"])
def test_cached_pixels_follow_the_processors_resize_and_center_crop(resize):
    """timm-style settings (bicubic, shortest edge, center crop 0.875) on a wide image: the same evaluation pixels,
    and training crops that keep the original's aspect although the cache stores a square."""
    settings = ProcessorSettings(image_size=32, resize=resize, crop_pct=0.875, interpolation="bicubic", hflip=True)
    processor = FusionProcessor(train_tokenizer(["picture"]), settings)
    noise = np.random.default_rng(0).integers(0, 256, (5, 9, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((90, 50), Image.Resampling.BICUBIC)
    cached = processor.cache_pixels(image, augment=False)
    assert torch.equal(processor.image_tensor(image), processor.image_tensor(cached))
    square = processor.cache_pixels(image, augment=True)
    assert square.shape == (41, 41, 3)  # ceil(32 / 0.875 / sqrt(0.8))
    keys = [(0, 1, index) for index in range(12)]
    crops = [(processor.image_tensor(image, key), processor.image_tensor(square, key, image.size)) for key in keys]
    same = np.mean([float((cached - plain).abs().mean()) for plain, cached in crops])
    other = np.mean([float((a[1] - b[0]).abs().mean()) for a, b in zip(crops, crops[1:])])
    assert same < 0.4 * other, (same, other)


@pytest.mark.parametrize("size", [(64, 64), (20, 36), (50, 30)])
def test_training_crops_of_an_image_that_fits_the_cache_are_the_uncached_crops(size):
    """An image no larger than the cache's side is stored as it is (never enlarged): every training crop and flip
    is the uncached path's, bit for bit (enlarging it first blurred the crops and cost accuracy)."""
    settings = ProcessorSettings(image_size=64, interpolation="bicubic", hflip=True)
    processor = FusionProcessor(train_tokenizer(["picture"]), settings)
    noise = np.random.default_rng(1).integers(0, 256, (7, 7, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)
    stored = processor.cache_pixels(image, augment=True)
    assert stored.shape == (72, 72, 3) and processor.cached_size(size) == size
    for index in range(8):
        key = (0, 2, index)
        assert torch.equal(processor.image_tensor(image, key), processor.image_tensor(stored, key, size)), index


def test_the_cache_is_rebuilt_when_the_data_or_the_settings_change(tmp_path):
    data, cache = _noisy_imagefolder(tmp_path / "data"), tmp_path / "cache"
    _prepare(data, cache)
    built = _entries(cache)
    assert len(built) == 2  # train (36 px, for crops) and validation (32 px)
    _prepare(data, cache)
    assert _entries(cache) == built  # reused, not rebuilt

    replaced = data / "validation" / "100.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(replaced)
    rebuilt = _prepare(data, cache)
    assert len(_entries(cache)) == 2 and _entries(cache) != built  # same key, new entry: an image file changed
    red = rebuilt.datasets["validation"][0]["pixel_values"]
    assert torch.equal(red, _prepare(data, None).datasets["validation"][0]["pixel_values"])
    assert red[0].mean() > 1.0 > red[1].mean()

    metadata = data / "train" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("picture", "photo"))
    _prepare(data, cache)
    assert len(_entries(cache)) == 3  # train's rows changed: a new key
    _prepare(data, cache, image_size=24)
    assert len(_entries(cache)) == 5  # another image size: new entries for both splits


def test_bad_images_are_reported_from_the_cache_as_when_decoding(tmp_path):
    data = _noisy_imagefolder(tmp_path / "data")
    (data / "train" / "003.png").unlink()
    (data / "train" / "005.png").write_bytes(b"not a png")
    reports = [
        _prepare(data, cache, on_error="skip").report for cache in (None, tmp_path / "cache", tmp_path / "cache")
    ]
    assert reports[0].total == 2 and all(r.counts == reports[0].counts for r in reports)
    assert all(r.examples == reports[0].examples for r in reports)
    for cache in (None, tmp_path / "cache"):
        with pytest.raises(
            Exception, match=r"train split, row 3, field 'image' \(file 003.png\): image file not found"
        ):
            _prepare(data, cache)


def test_training_through_the_cache_and_resuming_it(tmp_path):
    data = _noisy_imagefolder(tmp_path / "data", train_rows=40)  # 5 batches an epoch
    common = ["--data.path", str(data), *TINY_TRAIN, "--train.max_steps", "6", "--train.eval_every", "6"]
    cache = ["--data.cache", str(tmp_path / "cache")]

    # Without augmentation the cache serves the decoded pixels: the same run, to the last bit.
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert train_in_process([*common, "--data.augment", "false", "--train.output_dir", str(plain)]) == 0
    assert train_in_process([*common, "--data.augment", "false", *cache, "--train.output_dir", str(cached)]) == 0
    a, b = load_file(plain / "final" / "model.safetensors"), load_file(cached / "final" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)

    # With augmentation, a run resumed mid-epoch from the cache equals the straight run.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    saving = ["--data.augment", "true", "--train.save_every", "3", "--train.log_every", "1"]
    assert train_in_process([*common, *cache, *saving, "--train.output_dir", str(straight)]) == 0
    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    assert (
        train_in_process([*common, *cache, *saving, "--train.output_dir", str(resumed), "--train.resume", "latest"])
        == 0
    )
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    logged = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["split"] == "train"] == [4, 5, 6]


def test_cache_and_streaming_exclude_each_other():
    from mmfusion.options import parse_args

    with pytest.raises(SystemExit, match="--data.cache needs map-style data"):
        parse_args(["--data.path", "x", "--data.streaming", "true", "--data.cache", "auto"])
