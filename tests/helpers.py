"""Tiny configurations and fake batches shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from mmfusion import FusionConfig, TaskSpec


def tiny_tasks() -> list[TaskSpec]:
    return [
        TaskSpec(name="topic", type="classification", num_labels=3, depths=[0, 1]),
        TaskSpec(name="tags", type="multilabel", num_labels=4),
        TaskSpec(name="score", type="regression", target_mean=2.0, target_std=3.0),
        TaskSpec(name="pair", type="matching"),
    ]


def tiny_config(image_encoder="simple_cnn", text_encoder="lstm", fusion="concat", **overrides) -> FusionConfig:
    values = dict(
        image_encoder=image_encoder,
        image_widths=[8, 16],
        image_size=32,
        text_encoder=text_encoder,
        text_dim=16,
        text_heads=2,
        vocab_size=50,
        max_text_length=32,
        fusion=fusion,
        dim=32,
        fusion_heads=2,
        rank=4,
        dropout=0.0,
        tasks=tiny_tasks(),
    )
    values.update(overrides)
    return FusionConfig(**values)


def tiny_batch(batch_size=4, length=10, vocab_size=50, image_size=32, seed=0) -> dict:
    """Images, right-padded token ids of different lengths, and labels with some missing."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([length, length - 3, 2, length - 1][:batch_size])
    ids = torch.randint(1, vocab_size, (batch_size, length), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": ids * mask,
        "attention_mask": mask.long(),
        "labels": {
            "topic": torch.tensor([0, 2, -1, 1][:batch_size]),
            "tags": torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 0, 0]][:batch_size]).float(),
            "score": torch.tensor([1.0, float("nan"), -2.0, 4.0][:batch_size]),
            "pair": torch.tensor([1, 1, 0, 1][:batch_size]),
        },
    }


def write_image(path, color=(200, 30, 30), size=(16, 16), mode="RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)


def make_rows(count: int, start: int = 0) -> list[dict]:
    """Rows of a tiny dataset: colour in the image decides `label`, the caption's first word decides `mood`."""
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220)}
    rows = []
    for i in range(start, start + count):
        color = "red" if i % 2 else "blue"
        mood = ["happy", "sad", "calm"][i % 3]
        rows.append(
            {
                "file_name": f"{i:03d}.png",
                "caption": f"{mood} picture number {i}",
                "label": color,
                "score": float(i % 5) / 4,
                "tags": sorted({color, mood}),
                "_color": colors[color],
            }
        )
    return rows


def make_imagefolder(root, splits=None, metadata="jsonl") -> None:
    """{split}/metadata.jsonl (or .csv) with images beside it."""
    import csv
    import json

    splits = splits or {"train": make_rows(12), "validation": make_rows(6, 100)}
    for split, rows in splits.items():
        directory = root / split
        directory.mkdir(parents=True, exist_ok=True)
        for row in rows:
            if "_color" in row:
                write_image(directory / row["file_name"], row["_color"])
        public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
        if metadata == "jsonl":
            (directory / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in public))
        else:
            with open(directory / "metadata.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=[k for k in public[0] if k != "tags"])
                writer.writeheader()
                writer.writerows({k: v for k, v in r.items() if k != "tags"} for r in public)


SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"


def sample_checkpoint(directory, image_encoder="simple_cnn", text_encoder="lstm", fusion="concat", seed=0, **overrides):
    """A tiny random model for the bundled sample data's tasks (labels, regression statistics and tokenizer from
    its test split, plus the `pair` matching task), saved with its processor as train.py saves best/."""
    from mmfusion.config import DataConfig
    from mmfusion.data import fit_tasks, infer_tasks, load_splits
    from mmfusion.model import FusionModel
    from mmfusion.processing import FusionProcessor, ProcessorSettings, hf_tokenizer, train_tokenizer

    data = DataConfig(path=str(SAMPLE / "test"))
    rows = load_splits(data.path, data, for_training=False).splits["train"]
    tasks, _ = infer_tasks(rows, data)
    tasks = fit_tasks([*tasks, TaskSpec(name="pair", type="matching")], rows, data)
    pad_id = 0
    if text_encoder == "hf":  # the model's own tokenizer, as train.py uses
        tokenizer, pad_id = hf_tokenizer(overrides["text_model"])
    else:
        tokenizer = train_tokenizer(rows["caption"], vocab_size=200)
    torch.manual_seed(seed)
    overrides = {"tasks": tasks, "vocab_size": tokenizer.get_vocab_size(), **overrides}
    model = FusionModel(tiny_config(image_encoder, text_encoder, fusion, **overrides))
    sizes = {"image_size": model.config.image_size, "max_text_length": model.config.max_text_length}
    processor = FusionProcessor(tokenizer, ProcessorSettings(**sizes, pad_id=pad_id))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def same_prediction(found, expected, tolerance=1e-5) -> bool:
    """Equal predictions; floats to `tolerance` (a batch's composition changes float rounding, not results), and
    labels equal unless a score within `tolerance` of a tie (or of 0.5, multilabel) could decide otherwise."""
    if isinstance(expected, dict) and "scores" in expected:
        scores = expected["scores"]
        if not same_prediction(found["scores"], scores, tolerance):
            return False
        if "label" in expected:
            top = sorted(scores.values())[-2:]
            return found["label"] == expected["label"] or top[1] - top[0] <= 2 * tolerance
        undecided = {name for name, p in scores.items() if abs(p - 0.5) <= tolerance}
        return set(found["labels"]) ^ set(expected["labels"]) <= undecided
    if isinstance(expected, dict):
        return found.keys() == expected.keys() and all(
            same_prediction(found[k], expected[k], tolerance) for k in expected
        )
    if isinstance(expected, float):
        return abs(found - expected) <= tolerance
    return found == expected


def png_bytes(color, size=(16, 16)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_hub_repo(root, splits=None, shards=2) -> None:
    """A Hub dataset repository: README.md and data/{split}-0000x-of-0000N.parquet shards whose `image` column is
    the Image feature ({bytes, path} structs)."""
    import datasets

    splits = splits or {"train": make_rows(12), "validation": make_rows(6, 100)}
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n# a tiny dataset\n")
    for split, rows in splits.items():
        table = [
            {"image": {"bytes": png_bytes(row["_color"]), "path": row["file_name"]}}
            | {k: v for k, v in row.items() if not k.startswith("_") and k != "file_name"}
            for row in rows
        ]
        data = datasets.Dataset.from_list(table).cast_column("image", datasets.Image())
        count = min(shards, len(rows))
        for index in range(count):
            data.shard(count, index, contiguous=True).to_parquet(
                root / "data" / f"{split}-{index:05d}-of-{count:05d}.parquet"
            )


def make_webdataset(root, splits=None, shards=2) -> None:
    """WebDataset tar shards {split}-0000x.tar: KEY.png, KEY.txt (the caption) and KEY.json (the labels)."""
    import io
    import json
    import tarfile

    splits = splits or {"train": make_rows(12), "validation": make_rows(6, 100)}
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        count = min(shards, len(rows))
        for index in range(count):
            with tarfile.open(root / f"{split}-{index:05d}.tar", "w") as tar:
                for row in rows[index::count]:
                    key = row["file_name"].split(".")[0]
                    labels = {k: v for k, v in row.items() if k not in ("file_name", "caption", "_color")}
                    files = {
                        "png": png_bytes(row["_color"]),
                        "txt": row["caption"].encode(),
                        "json": json.dumps(labels).encode(),
                    }
                    for extension, data in files.items():
                        info = tarfile.TarInfo(f"{key}.{extension}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))


TINY_TRAIN = ["--model.image_widths", "8", "16", "--model.text_dim", "16", "--model.dim", "32"]
TINY_TRAIN += ["--model.image_size", "32", "--train.batch_size", "8", "--train.eval_batch_size", "5"]
TINY_TRAIN += ["--train.report", "false"]


def train_in_process(args: list[str]) -> int:
    """train.py's main in this process, with accelerate's global state reset first (so runs can follow each other)."""
    import sys

    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train

    return train.main(args)
