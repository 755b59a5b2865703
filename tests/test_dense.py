"""Dense tasks (segmentation, dense_regression): a referring-segmentation set learned from the text, masks through
the image's own augmentation, hand-computed metrics and losses, bad masks, loss weightings, and the whole path from
train.py to `mmfusion predict` and the report."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import _one_and_two_processes, _records, _run

from mmfusion import Config, FusionConfig, FusionModel, Predictor, TaskSpec, cli
from mmfusion.config import DataConfig
from mmfusion.dense_metrics import DenseTaskMetrics
from mmfusion.errors import BadInputError, InputError
from mmfusion.feature_cache import wanted
from mmfusion.losses import default_label_mask, task_loss
from mmfusion.metrics import MultiTaskMetrics, delta_m
from mmfusion.options import load_yaml
from mmfusion.prepare import build_splits
from mmfusion.processing import FusionProcessor, ProcessorSettings, train_tokenizer
from mmfusion.rows import RowReader
from mmfusion.weighting import WEIGHTINGS, build_weighting, shared_tensors, weighted_backward

ROOT = Path(__file__).resolve().parents[1]
SIDE = 24  # the synthetic sets' image side
COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30)}


def squares(seed: int, side: int = 6) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Two differently coloured squares at non-overlapping random positions: {colour: (top, left)}."""
    rng = np.random.default_rng(seed)
    names = list(rng.choice(sorted(COLOURS), 2, replace=False))
    while True:
        corners = rng.integers(0, SIDE - side + 1, size=(2, 2))
        if np.abs(corners[0] - corners[1]).max() >= side + 1:
            return dict(zip(names, map(tuple, corners.tolist()))), names


# ----- the text chooses the map -----


def referring_set(count: int, seed: int, side: int = 6):
    """Images (normalised pixels), each square's mask [N, 2, S, S] and each square's colour word id [N, 2]."""
    words = {name: i + 1 for i, name in enumerate(sorted(COLOURS))}
    images = torch.full((count, 3, SIDE, SIDE), -1.0)
    masks = torch.zeros(count, 2, SIDE, SIDE, dtype=torch.long)
    ids = torch.zeros(count, 2, dtype=torch.long)
    for i in range(count):
        placed, names = squares(seed * 100_000 + i, side)
        for k, name in enumerate(names):
            top, left = placed[name]
            saturated = torch.tensor(COLOURS[name]).gt(128).float() * 2 - 1  # pixel values at -1 or 1
            images[i, :, top : top + side, left : left + side] = saturated.view(3, 1, 1)
            masks[i, k, top : top + side, left : left + side] = 1
            ids[i, k] = words[name]
    return images, masks, ids


def _named(images, masks, ids, which):
    rows = torch.arange(len(images))
    inputs = {
        "pixel_values": images,
        "input_ids": ids[rows, which, None],
        "attention_mask": torch.ones_like(ids[:, :1]),
    }
    return inputs, masks[rows, which]


@pytest.mark.timeout(120)
def test_a_tiny_model_learns_referring_segmentation_and_the_caption_chooses_the_mask():
    """Two squares per image, the caption names one colour: after a few seconds of training the mask follows the
    caption (mIoU >= 0.9 for either square), so swapping the caption swaps the mask."""
    torch.manual_seed(0)
    spec = TaskSpec("object", "segmentation", num_labels=2, dice_weight=1.0)
    sizes = {"image_widths": [16, 32], "image_size": SIDE, "text_dim": 16, "vocab_size": 4, "dim": 32}
    config = FusionConfig(**sizes, fusion="film", dropout=0.0, decoder_dim=32, tasks=[spec])
    model = FusionModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 200)
    images, masks, ids = referring_set(512, seed=0)
    for step in range(200):  # about 6 s on one core; with 12 seeds the worst mIoU was 0.957
        generator = torch.Generator().manual_seed(step)
        rows, which = torch.randint(0, 512, (32,), generator=generator), torch.randint(0, 2, (32,), generator=generator)
        inputs, target = _named(images[rows], masks[rows], ids[rows], which)
        loss = model(**inputs, labels={"object": target}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    images, masks, ids = referring_set(128, seed=1)
    predicted = {}
    with torch.no_grad():
        for which in (0, 1):
            inputs, target = _named(images, masks, ids, torch.full((128,), which))
            predicted[which] = model(**inputs).logits["object"].argmax(1)
            metrics = DenseTaskMetrics(spec)
            metrics.update(predicted[which], target, torch.ones(128, dtype=torch.bool))
            assert metrics.compute()["miou"] >= 0.9, (which, metrics.compute())
    # The same images with the other caption: the other square, not the first one again.
    overlap = (predicted[0].bool() & predicted[1].bool()).sum() / (predicted[0].bool() | predicted[1].bool()).sum()
    assert overlap < 0.1


# ----- masks follow their image -----


def _processor(**settings) -> FusionProcessor:
    return FusionProcessor(train_tokenizer(["a red square"]), ProcessorSettings(**settings))


def _coded_row(directory: Path, size=(40, 30), seed=0) -> dict:
    """An image whose red channel spells its mask's class id (20 x id) at every pixel, and that mask."""
    ids = np.random.default_rng(seed).integers(0, 10, size=size[::-1]).astype(np.uint8)
    image = np.zeros((*ids.shape, 3), dtype=np.uint8)
    image[..., 0] = ids * 20
    directory.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(directory / "image.png")
    Image.fromarray(ids).save(directory / "mask.png")
    return {"image": "image.png", "caption": "a red square", "mask": "mask.png"}


def _reader(directory: Path, processor: FusionProcessor, spec: TaskSpec) -> RowReader:
    data = DataConfig(image_column="image", text_column="caption")
    return RowReader(processor, [spec], data, directory, "train")


@pytest.mark.parametrize(
    "settings",
    [
        {"resize": "squash", "crop_pct": 1.0},
        {"resize": "shortest_edge", "crop_pct": 0.875},
    ],
)
def test_mask_augmentation_equals_the_image_crop_pixel_for_pixel(tmp_path, settings):
    identity = {"mean": (0, 0, 0), "std": (1, 1, 1)}  # pixel values stay in [0, 1]
    processor = _processor(
        image_size=16, hflip=True, crop_scale=(0.3, 1.0), interpolation="nearest", **identity, **settings
    )
    spec = TaskSpec("mask", "segmentation", num_labels=10)
    reader = _reader(tmp_path, processor, spec)
    row = _coded_row(tmp_path)
    crops = set()
    for epoch in range(3):
        for index in range(4):
            read = reader.read(row, index, epoch=epoch, augment=True, seed=7)
            ids_in_image = (read["pixel_values"][0] * 255).round().long() // 20
            assert read["label_mask"]["mask"] and read["labels"]["mask"].dtype == torch.long
            assert torch.equal(read["labels"]["mask"], ids_in_image), (epoch, index)
            again = reader.read(row, index, epoch=epoch, augment=True, seed=7)  # exact resume: same key, same crop
            assert torch.equal(again["labels"]["mask"], read["labels"]["mask"])
            crops.add(read["labels"]["mask"].numpy().tobytes())
    assert len(crops) == 12  # every (epoch, index) draws its own crop and flip


def test_output_stride_samples_the_augmented_mask(tmp_path):
    processor = _processor(image_size=16, hflip=True, interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))
    row = _coded_row(tmp_path)
    full = _reader(tmp_path, processor, TaskSpec("mask", "segmentation", num_labels=10)).read(row, 3, 1, True, 5)
    spec = TaskSpec("mask", "segmentation", num_labels=10, output_stride=4)
    coarse = _reader(tmp_path, processor, spec).read(row, 3, 1, True, 5)["labels"]["mask"]
    assert coarse.shape == (4, 4)
    blocks = full["labels"]["mask"].view(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(4, 4, 16)
    assert all(coarse[i, j] in blocks[i, j] for i in range(4) for j in range(4))  # nearest neighbour in its block


def test_dense_regression_masks_png16_and_npy_with_invalid_pixels(tmp_path):
    processor = _processor(image_size=8, interpolation="nearest")
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 100
    Image.fromarray(stored).save(tmp_path / "depth.png")
    values = stored.astype(np.float32)
    values[0, :3] = np.nan
    np.save(tmp_path / "depth.npy", values)
    spec = TaskSpec("depth", "dense_regression", value_scale=0.01, invalid_value=0)
    reader = _reader(tmp_path, processor, spec)
    from_png = reader.read({"image": "image.png", "caption": "a", "depth": "depth.png"}, 0)["labels"]["depth"]
    from_npy = reader.read({"image": "image.png", "caption": "a", "depth": "depth.npy"}, 0)["labels"]["depth"]
    expected = torch.from_numpy(stored / 100).float()
    expected[0, 0] = float("nan")  # the stored 0 is invalid_value
    torch.testing.assert_close(from_png, expected, equal_nan=True)
    assert torch.isnan(from_npy[0, :3]).all() and torch.equal(from_npy[1:], expected[1:])


def test_a_missing_mask_or_image_leaves_the_row_unlabelled(tmp_path):
    processor = _processor(image_size=8)
    _coded_row(tmp_path)
    spec = TaskSpec("mask", "segmentation", num_labels=10)
    reader = RowReader(processor, [spec], DataConfig(image_column="image"), tmp_path, "train", True)
    for row in (
        {"image": "image.png", "caption": "a", "mask": None},
        {"image": None, "caption": "a", "mask": "mask.png"},
    ):
        read = reader.read(row, 0)
        assert not read["label_mask"]["mask"] and (read["labels"]["mask"] == 255).all()


# ----- bad masks -----


def dense_folder(root: Path, rows: int = 12, start: int = 0) -> list[dict]:
    """An imagefolder split of referring rows: `object` (palette PNG), `kinds` (L PNG, 255 border) and `height`
    (.npy) masks in masks/, as `X_file_name` columns."""
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(start, start + rows):
        placed, names = squares(index)
        image = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
        kinds = np.zeros((SIDE, SIDE), dtype=np.uint8)
        for name in names:
            top, left = placed[name]
            image[top : top + 6, left : left + 6] = COLOURS[name]
            kinds[top : top + 6, left : left + 6] = sorted(COLOURS).index(name) + 1
        named = names[index % 2]
        top, left = placed[named]
        chosen = np.zeros((SIDE, SIDE), dtype=np.uint8)
        chosen[top : top + 6, left : left + 6] = 1
        height = np.where(kinds == 0, np.nan, kinds / 2).astype(np.float32)
        kinds[0] = 255
        Image.fromarray(image).save(root / f"{index:03d}.png")
        palette = Image.frombytes("P", (SIDE, SIDE), chosen.tobytes())
        palette.putpalette([0, 0, 0, 255, 255, 255])
        palette.save(root / f"masks/{index:03d}_object.png")
        Image.fromarray(kinds).save(root / f"masks/{index:03d}_kinds.png")
        np.save(root / f"masks/{index:03d}_height.npy", height)
        lines.append(
            {
                "file_name": f"{index:03d}.png",
                "caption": f"the {named} square",
                "object_file_name": f"masks/{index:03d}_object.png",
                "kinds_file_name": f"masks/{index:03d}_kinds.png",
                "height_file_name": f"masks/{index:03d}_height.npy",
                "big": names[0] == "red",
            }
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def dense_tasks() -> list[TaskSpec]:
    return [
        TaskSpec("object", "segmentation", labels=["background", "object"], depths=[0, -1]),
        TaskSpec("kinds", "segmentation", num_labels=4, dice_weight=0.5),
        TaskSpec("height", "dense_regression", loss="l1", output_stride=2),
        TaskSpec("big", "classification"),
    ]


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dense")
    dense_folder(root / "train", 24)
    dense_folder(root / "validation", 8, start=100)
    return root


def _dense_config(data: Path) -> Config:
    model = FusionConfig(image_widths=[8, 16], image_size=SIDE, text_dim=16, dim=32, decoder_dim=8)
    return Config(data=DataConfig(path=str(data)), model=model, tasks=dense_tasks())


def _broken(data: Path, tmp_path: Path, change) -> Config:
    """A copy of the dense data with `change(train_directory, metadata_rows)` applied."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data, root)
    rows = [json.loads(line) for line in (root / "train" / "metadata.jsonl").read_text().splitlines()]
    change(root / "train", rows)
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Config(data=DataConfig(path=str(root)), model=FusionConfig(image_size=SIDE), tasks=dense_tasks())


def _mask_file(column: str, write):
    def change(directory, rows):
        write(directory / rows[2][f"{column}_file_name"])

    return change


def _mask_value(column: str, value):
    def change(directory, rows):
        rows[2][f"{column}_file_name"] = value

    return change


BAD_MASKS = {
    "missing mask file": (
        _mask_value("object", "masks/gone.png"),
        r"train split, row 2, field 'object' \(file masks/gone.png\): mask file not found",
    ),
    "unreadable mask": (
        _mask_file("object", lambda p: p.write_bytes(b"not a png")),
        r"row 2, field 'object' \(file masks/002_object.png\): not a readable mask",
    ),
    "mask of the wrong size": (
        _mask_file("kinds", lambda p: Image.new("L", (SIDE, SIDE - 1)).save(p)),
        rf"row 2, field 'kinds' \(file masks/002_kinds.png\): mask of {SIDE}x{SIDE - 1} pixels does not match its "
        rf"image of {SIDE}x{SIDE}",
    ),
    "class id out of range": (
        _mask_file("kinds", lambda p: Image.fromarray(np.full((SIDE, SIDE), 7, np.uint8)).save(p)),
        r"row 2, field 'kinds' \(file masks/002_kinds.png\): class ids \[7\] out of range for task 'kinds' "
        r"\(ids 0..3, 255 for unlabelled pixels\)",
    ),
    "colour mask": (
        _mask_file("object", lambda p: Image.new("RGB", (SIDE, SIDE)).save(p)),
        r"row 2, field 'object' .*expected a mask image of class ids \(single-channel or palette\), got a RGB image",
    ),
    "npy of the wrong shape": (
        _mask_file("height", lambda p: np.save(p, np.zeros((2, SIDE, SIDE), np.float32))),
        r"row 2, field 'height' \(file masks/002_height.npy\): expected a 2-D mask, got an array of shape \(2, 24, 24\)",
    ),
    "mask path escaping the data directory": (
        _mask_value("object", "../../secret.png"),
        r"row 2, field 'object' .*mask path '../../secret.png' escapes the data directory",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MASKS))
def test_bad_masks_stop_with_split_row_field_and_file(dense_data, tmp_path, case):
    change, message = BAD_MASKS[case]
    with pytest.raises(BadInputError, match=message):
        build_splits(_broken(dense_data, tmp_path, change))


def test_bad_masks_are_skipped_and_counted(dense_data, tmp_path):
    def several(directory, rows):
        rows[1]["object_file_name"] = "masks/gone.png"
        (directory / rows[3]["kinds_file_name"]).write_bytes(b"junk")
        Image.new("L", (3, 3)).save(directory / rows[5]["kinds_file_name"])
        Image.fromarray(np.full((SIDE, SIDE), 9, np.uint8)).save(directory / rows[7]["kinds_file_name"])
        rows[9]["object_file_name"] = None  # a missing mask is no error: the row is unlabelled for the task

    config = _broken(dense_data, tmp_path, several)
    config.data.on_error = "skip"
    prepared = build_splits(config)
    summary = prepared.report.summary()
    assert "skipped 4 bad rows" in summary
    for reason in ("missing mask file", "unreadable mask", "mask size mismatch", "mask class id out of range"):
        assert f"train: 1 x {reason}" in summary
    rows = {int(prepared.datasets["train"][i]["row"]): i for i in range(len(prepared.datasets["train"]))}
    assert not prepared.datasets["train"][rows[9]]["label_mask"]["object"]


def test_mask_columns_are_not_taken_for_class_labels(dense_data):
    config = Config(data=DataConfig(path=str(dense_data)), model=FusionConfig(image_size=SIDE))
    prepared = build_splits(config, splits=("train",))
    assert [spec.name for spec in prepared.tasks] == ["big"]
    assert any("'object' (file paths) ignored" in note for note in prepared.notes)


def test_dense_regression_statistics_come_from_the_training_masks(dense_data):
    prepared = build_splits(_dense_config(dense_data), splits=("train",))
    height = next(spec for spec in prepared.tasks if spec.name == "height")
    pixels = np.concatenate(
        [(np.load(p)[np.isfinite(np.load(p))]) for p in sorted((dense_data / "train" / "masks").glob("*.npy"))]
    )
    assert height.target_mean == pytest.approx(pixels.mean(), rel=1e-5)
    assert height.target_std == pytest.approx(pixels.std(), rel=1e-4)


def test_segmentation_needs_its_class_count(dense_data):
    config = _dense_config(dense_data)
    config.tasks[1] = TaskSpec("kinds", "segmentation")
    with pytest.raises(Exception, match="segmentation task 'kinds' needs num_labels"):
        build_splits(config, splits=("train",))


# ----- losses and metrics by hand -----


def test_segmentation_loss_leaves_out_ignored_pixels_and_unlabelled_samples():
    spec = TaskSpec("s", "segmentation", num_labels=3)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0, :2] = 255
    mask = torch.tensor([True, False])
    loss = task_loss(spec, logits, labels, mask)
    valid = labels[0] != 255
    expected = torch.nn.functional.cross_entropy(logits[0].permute(1, 2, 0)[valid], labels[0][valid])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (logits.grad[1] == 0).all() and (logits.grad[0][:, 0, :2] == 0).all()
    assert default_label_mask(spec, torch.full((1, 4, 4), 255)).tolist() == [False]
    none = task_loss(spec, logits, labels, torch.tensor([False, False]))  # a batch without labels: zero, not NaN
    assert none.item() == 0 and none.requires_grad


def test_dice_term_of_a_perfect_prediction_is_zero_and_of_a_wrong_one_positive():
    spec = TaskSpec("s", "segmentation", num_labels=2, dice_weight=1.0)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2] = 1
    confident = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float() * 50
    mask = torch.tensor([True])
    assert task_loss(spec, confident, labels, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert task_loss(spec, -confident, labels, mask).item() > 50


def test_dense_regression_losses_use_valid_pixels_only():
    labels = torch.tensor([[[1.0, float("nan")], [3.0, 5.0]]])
    mask = torch.tensor([True])
    spec = TaskSpec("d", "dense_regression", loss="l1", target_mean=2.0, target_std=2.0)
    predictions = torch.zeros(1, 2, 2)
    assert task_loss(spec, predictions, labels, mask).item() == pytest.approx((0.5 + 0.5 + 1.5) / 3)
    silog = TaskSpec("d", "dense_regression", loss="silog")
    exact = torch.log(torch.nan_to_num(labels, nan=1.0))
    assert task_loss(silog, exact, labels, mask).item() == pytest.approx(0.0, abs=1e-3)
    assert task_loss(silog, exact + 1.0, labels, mask).item() == pytest.approx((1 - 0.85) ** 0.5, abs=1e-3)


def test_segmentation_metrics_match_a_hand_computation():
    spec = TaskSpec("s", "segmentation", labels=["sky", "road", "car", "bike"])
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]], [[0, 1, 1, 1], [2, 0, 0, 255]]])
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 3, 1]], [[0, 1, 2, 1], [2, 0, 0, 0]]])
    unlabelled = torch.zeros(1, 2, 4, dtype=torch.long)  # a third sample whose mask is False
    metrics = DenseTaskMetrics(spec)
    metrics.update(predicted[:1], target[:1], torch.tensor([True]))
    metrics.update(
        torch.cat([predicted[1:], unlabelled]), torch.cat([target[1:], unlabelled]), torch.tensor([True, False])
    )
    valid = target != 255
    t, p = target[valid].numpy(), predicted[valid].numpy()
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (t, p), 1)
    with np.errstate(invalid="ignore"):  # bike: 0 / 0
        iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    computed = metrics.compute()
    assert computed["count"] == 2
    assert computed["miou"] == pytest.approx(np.nanmean(iou[:3]))  # bike: in neither targets nor valid predictions
    assert computed["pixel_accuracy"] == pytest.approx((t == p).mean())
    for k, name in enumerate(spec.labels[:3]):
        assert computed[f"iou/{name}"] == pytest.approx(iou[k])
        assert computed[f"accuracy/{name}"] == pytest.approx(confusion[k, k] / confusion[k].sum())
    assert computed["iou/bike"] == 0.0


def test_dense_regression_metrics_match_a_hand_computation():
    spec = TaskSpec("d", "dense_regression", target_mean=1.0, target_std=2.0)
    target = torch.tensor([[[2.0, 0.0], [float("nan"), 4.0]], [[1.0, 3.0], [5.0, float("nan")]]])
    outputs = torch.tensor([[[0.0, 1.0], [3.0, 1.0]], [[0.5, 0.5], [1.0, -1.0]]])  # standardised
    metrics = DenseTaskMetrics(spec)
    metrics.update(outputs, target, torch.tensor([True, True]))
    valid = torch.isfinite(target)
    p, t = (outputs * 2 + 1)[valid].double().numpy(), target[valid].double().numpy()
    computed = metrics.compute()
    assert computed["rmse"] == pytest.approx(np.sqrt(((p - t) ** 2).mean()))
    assert computed["mae"] == pytest.approx(np.abs(p - t).mean())
    nonzero = t != 0
    assert computed["abs_rel"] == pytest.approx((np.abs(p - t)[nonzero] / np.abs(t[nonzero])).mean())
    assert computed["r2"] == pytest.approx(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())


def test_summary_uses_miou_and_delta_m_leaves_out_per_class_values():
    spec = TaskSpec("s", "segmentation", labels=["a", "b"])
    multi = MultiTaskMetrics([spec])
    target = torch.tensor([[[0, 1], [1, 1]]])
    multi.update({"s": target.float()}, {"s": target}, {"s": torch.tensor([True])})
    assert multi.compute()["summary"] == 1.0
    better = {"s": {"miou": 0.6, "iou/a": 1.0}}
    assert delta_m(better, {"s": {"miou": 0.5, "iou/a": 0.1}}, [spec]) == pytest.approx(20.0)


# ----- the model -----


def _dense_batch(size=4) -> dict:
    generator = torch.Generator().manual_seed(0)
    kinds = torch.randint(0, 4, (size, SIDE, SIDE), generator=generator)
    kinds[0, 0] = 255
    height = torch.rand(size, SIDE // 2, SIDE // 2, generator=generator)
    height[1, :3] = float("nan")
    return {
        "pixel_values": torch.randn(size, 3, SIDE, SIDE, generator=generator),
        "input_ids": torch.randint(1, 20, (size, 5), generator=generator),
        "attention_mask": torch.ones(size, 5, dtype=torch.long),
        "labels": {
            "object": torch.randint(0, 2, (size, SIDE, SIDE), generator=generator),
            "kinds": kinds,
            "height": height,
            "big": torch.tensor([0, 1, -1, 1])[:size],
        },
    }


def _dense_model(fusion="gated", **overrides) -> FusionModel:
    tasks = [spec if spec.name != "big" else TaskSpec("big", num_labels=2) for spec in dense_tasks()]
    values = {"image_widths": [8, 16], "image_size": SIDE, "text_dim": 16, "vocab_size": 20, "fusion": fusion}
    values.update(dim=32, fusion_heads=2, dropout=0.0, decoder_dim=8, tasks=tasks)
    torch.manual_seed(0)
    return FusionModel(FusionConfig(**{**values, **overrides}))


def test_deep_supervision_adds_the_earlier_decoder_stages_in_training_only():
    model = _dense_model()
    batch = _dense_batch()
    head = model.heads["object"]
    assert head.depths == [0, len(head.stages) - 1]
    model.train()
    training = model(**batch).task_losses["object"]
    model.eval()
    evaluation = model(**batch).task_losses["object"]
    aux = head.outputs["0"]
    with torch.no_grad():
        aux.weight.mul_(2)
    model.train()
    assert model(**batch).task_losses["object"] != training  # the stage-0 output layer counts in training
    model.eval()
    assert model(**batch).task_losses["object"] == evaluation  # and not in evaluation
    with pytest.raises(ValueError, match=r"task 'object': depths \[5\] are outside the decoder's 2 stages"):
        _dense_model(tasks=[TaskSpec("object", "segmentation", num_labels=2, depths=[5])])


def test_an_absent_image_gives_maps_that_do_not_depend_on_its_pixels():
    """Without the image (the evaluation condition `without_image`, modality dropout) a dense head sees zero
    feature maps, as the other heads see the placeholder."""
    model = _dense_model().eval()
    batch = {k: v for k, v in _dense_batch().items() if k != "labels"}
    absent = torch.tensor([False, True, True, True])
    with torch.no_grad():
        first = model(**batch, image_present=absent).logits
        noise = {**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}
        second = model(**noise, image_present=absent).logits
    for name in ("object", "kinds", "height"):
        torch.testing.assert_close(first[name][0], second[name][0])
        assert not torch.allclose(first[name][1:], second[name][1:])


ACCELERATOR = SimpleNamespace(
    num_processes=1, scaler=None, reduce=lambda x, op: x, backward=lambda loss: loss.backward()
)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_dense_and_per_pair_tasks_train_together_under_every_loss_weighting(name):
    model = _dense_model().train()
    batch = _dense_batch()
    output = model(**batch)
    weighting = build_weighting(name, model.config.tasks)
    present = torch.ones(len(model.config.tasks), dtype=torch.bool)
    loss = weighted_backward(ACCELERATOR, model, weighting, output, present, step=0)
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_gradient_weightings_see_the_dense_tasks_on_the_feature_maps():
    """On the shared representation a dense task's gradient flows through the image maps its decoder reads (its
    FiLM from the fused vector starts at zero, so the fused vector alone would show no gradient at first)."""
    model = _dense_model().train()
    output = model(**_dense_batch())
    weighting = build_weighting("gradnorm", model.config.tasks)
    shared = shared_tensors(model, output, weighting)
    assert len(output.extras["image_maps"]) == 2
    assert all(a is b for a, b in zip(shared[-2:], output.extras["image_maps"]))
    for name in ("object", "kinds", "height"):
        on_fused = torch.autograd.grad(output.task_losses[name], [output.fused], retain_graph=True, allow_unused=True)
        assert on_fused[0] is None or on_fused[0].abs().max() == 0
    present = torch.ones(4, dtype=torch.bool)
    weighting.observe(output.task_losses, present, shared, ACCELERATOR)
    assert (weighting.current > 0).all(), weighting.current


def test_the_feature_cache_is_not_used_with_dense_tasks():
    model = _dense_model(freeze_image=True, freeze_text=True)
    assert wanted(None, model, streaming=False) is False
    with pytest.raises(InputError, match="dense tasks read the image feature maps"):
        wanted(True, model, streaming=False)


def test_sample_dense_recipe_reads():
    config = load_yaml(ROOT / "configs" / "sample_dense.yaml")
    assert config.data.text_column == "referral"
    kinds = {spec.name: spec.type for spec in config.tasks}
    assert kinds["shapes"] == kinds["object"] == "segmentation" and config.tasks[0].num_labels == 5


# ----- from train.py to predictions and the report -----


@pytest.mark.timeout(300)
def test_train_predict_evaluate_and_report_with_dense_tasks(dense_data, tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "run.yaml").write_text(json.dumps({"tasks": [dataclasses.asdict(spec) for spec in dense_tasks()]}))
    args = ["--config", str(tmp_path / "run.yaml"), "--data.path", str(dense_data), "--model.image_widths", "8", "16"]
    args += ["--model.image_size", str(SIDE), "--model.dim", "32", "--model.decoder_dim", "8", "--model.text_dim", "16"]
    args += [
        "--train.max_steps",
        "3",
        "--train.batch_size",
        "8",
        "--train.output_dir",
        str(out),
        "--train.report",
        "false",
    ]
    assert _run(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"object: miou \d\.\d{4}, pixel_accuracy", printed)

    predictor = Predictor.from_pretrained(out / "best")
    image = dense_data / "validation" / "100.png"
    result = predictor.predict([str(image)], ["the red square"])[0]
    assert result["object"]["mask"].shape == (SIDE, SIDE) and result["object"]["mask"].dtype == np.uint8
    assert set(result["object"]["pixels"]) == {"background", "object"}
    assert result["height"]["values"].shape == (SIDE // 2, SIDE // 2)  # output_stride 2
    assert result["height"]["values"].dtype == np.float32

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"image": str(image), "caption": "the blue square"}) + "\n")
    assert cli.main(["predict", str(out / "best"), "--input", str(rows), "--output", str(tmp_path / "p.jsonl")]) == 0
    line = json.loads((tmp_path / "p.jsonl").read_text())["predictions"]
    written = Image.open(line["object"]["mask"])
    expected = predictor.predict([str(image)], ["the blue square"])[0]["object"]["mask"]
    assert written.mode == "P" and np.array_equal(np.asarray(written), expected)
    assert Path(line["object"]["overlay"]).parent == tmp_path / "p_masks" and Path(line["object"]["overlay"]).is_file()
    assert np.load(line["height"]["values"]).shape == (SIDE // 2, SIDE // 2)

    assert cli.main(["evaluate", str(out / "best"), "--data.path", str(dense_data), "--split", "validation"]) == 0
    assert "iou/object" in capsys.readouterr().out

    from mmfusion.report import write_report

    page = write_report(out).read_text()
    assert "Dense tasks (validation)" in page and "Per-class IoU and pixel accuracy" in page
    assert (out / "report" / "masks.png").is_file()
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1))
    assert set(data["checkpoint"]["dense"]["kinds"]) >= {"miou", "iou/0", "iou/3", "pixel_accuracy"}

    # DataFrames in and out: maps as arrays per row; evaluation of a frame equals `mmfusion evaluate` on the files
    import pandas

    folder = dense_data / "validation"
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    frame = pandas.DataFrame(
        {
            "image": [str(folder / line["file_name"]) for line in lines],
            "caption": [line["caption"] for line in lines],
            **{task: [str(folder / line[f"{task}_file_name"]) for line in lines] for task in ("object", "kinds")},
            "height": [str(folder / line["height_file_name"]) for line in lines],
            "big": [line["big"] for line in lines],
        }
    )
    predicted = predictor.predict(frame)
    expected = predictor.predict(list(frame["image"]), list(frame["caption"]))
    assert all(np.array_equal(a, b["object"]["mask"]) for a, b in zip(predicted["object"], expected))
    assert all(np.array_equal(a, b["height"]["values"]) for a, b in zip(predicted["height"], expected))
    assert list(predicted["kinds_pixels_0"]) == [row["kinds"]["pixels"]["0"] for row in expected]
    record = tmp_path / "metrics.json"
    command = ["evaluate", str(out / "best"), "--data.path", str(dense_data), "--split", "validation"]
    assert cli.main([*command, "--output", str(record)]) == 0
    assert predictor.evaluate(frame, split="validation") == json.loads(record.read_text())["metrics"]

    # served: the maps as nested lists; exported: the graph's maps are torch's
    from fastapi.testclient import TestClient

    from mmfusion.export import export_onnx
    from mmfusion.serve import create_app

    app = create_app(predictor, cli.Serve(checkpoint=str(out / "best")), str(out / "best"))
    with TestClient(app) as client:
        answer = client.post(
            "/predict", files={"image": ("x.png", image.read_bytes())}, data={"text": "the red square"}
        )
    assert answer.status_code == 200
    assert np.array_equal(np.array(answer.json()["predictions"]["object"]["mask"]), result["object"]["mask"])
    exported = export_onnx(out / "best", tmp_path / "onnx").path.parent
    graph = Predictor.from_pretrained(exported, backend="onnx").predict([str(image)], ["the red square"])[0]
    assert np.array_equal(graph["object"]["mask"], result["object"]["mask"])
    assert np.allclose(graph["height"]["values"], result["height"]["values"], atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_match_one_process_on_dense_tasks(dense_data, tmp_path):
    """GradNorm (task gradients on the image maps, outside DDP's sync) and dense metrics gathered from two processes
    (an uneven last evaluation batch included) give the weights and metrics of one process with the same global
    batch, up to float rounding. Images get a texture: on flat colours Adam scales rounding noise up (see
    test_train's test of the same name)."""
    data = tmp_path / "data"
    shutil.copytree(dense_data, data)
    for path in data.glob("*/[0-9]*.png"):
        noise = np.random.default_rng(int(path.stem)).integers(-60, 60, (SIDE, SIDE, 3))
        pixels = np.clip(np.asarray(Image.open(path), dtype=np.int64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
    (tmp_path / "run.yaml").write_text(json.dumps({"tasks": [dataclasses.asdict(spec) for spec in dense_tasks()]}))
    common = ["--config", str(tmp_path / "run.yaml"), "--data.path", str(data), "--data.augment", "false"]
    common += ["--model.image_widths", "8", "16", "--model.image_size", str(SIDE), "--model.dim", "32"]
    common += ["--model.text_dim", "16", "--model.decoder_dim", "8", "--model.dropout", "0"]
    common += ["--train.max_steps", "4", "--train.eval_every", "4", "--train.eval_batch_size", "3"]
    common += ["--train.loss_weighting", "gradnorm", "--train.report", "false"]
    one, two = _one_and_two_processes(common, tmp_path)
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=2e-6, msg=name)
    first, second = _records(one, "validation")[-1], _records(two, "validation")[-1]
    assert first["object"]["count"] == second["object"]["count"] == 8  # every row once, none repeated
    for task in ("object", "kinds", "height"):
        assert first[task] == pytest.approx(second[task], rel=1e-5, abs=1e-6), task
