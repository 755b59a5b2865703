"""A stream larger than you would hold in memory: 1,000,000 rows in Hub-layout parquet shards
(data/train-000xx-of-000NN.parquet, the Image feature's {bytes, path} structs), read end to end by mmfusion's
training stream (shuffle buffer, row checks, image decoding, tokenising, batching), with the process's resident memory
sampled over the whole pass; then how fast a resumed stream passes over rows it already read, and train.py on the
stream for a part of it (the model on CPU is far slower than the pipeline, so not over all the rows).

    python benchmarks/stream.py [--rows 1000000] [--shards 20] [--train-steps 150] [--keep DIR]

Writes benchmarks/results/stream.json. The shards go to a temporary directory (about 0.3 GB for a million rows),
removed at the end unless --keep names a directory to keep them in.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import psutil
from common import ROOT, write_result

sys.path.insert(0, str(ROOT))
WORDS = ["red", "green", "blue", "yellow", "small", "large", "square", "circle", "left", "right", "top", "bottom"]
COLOURS = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [230, 220, 30]], dtype=np.uint8)
SIDE = 16


def _shard(job: tuple[Path, int, int, int]) -> int:
    """Rows [start, start + count) as one parquet shard: a 16 px image of 4 x 4 colour blocks whose main colour is
    the label, a caption, a score."""
    import datasets
    from PIL import Image

    path, start, count, seed = job
    rng = np.random.default_rng([seed, start])
    labels = rng.integers(0, len(COLOURS), count)
    blocks = rng.integers(0, 60, (count, 4, 4, 3)).astype(np.uint8) + COLOURS[labels][:, None, None, :] // 2
    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(blocks[i]).resize((SIDE, SIDE), Image.Resampling.NEAREST).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": f"{start + i}.png"})
    words = rng.integers(0, len(WORDS), (count, 5))
    captions = [" ".join(WORDS[w] for w in row) for row in words]
    names = ["red", "green", "blue", "yellow"]
    table = datasets.Dataset.from_dict(
        {
            "image": images,
            "caption": captions,
            "label": [names[label] for label in labels],
            "score": rng.random(count).round(4).tolist(),
        }
    ).cast_column("image", datasets.Image())
    table.to_parquet(path)
    return count


def generate(root: Path, rows: int, shards: int) -> dict:
    """Train shards and one validation shard, written by a process pool."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    per_shard = -(-rows // shards)
    names = [root / "data" / f"train-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]
    jobs = [(name, i * per_shard, min(per_shard, rows - i * per_shard), 0) for i, name in enumerate(names)]
    jobs.append((root / "data" / "validation-00000-of-00001.parquet", 0, 2000, 1))
    start = time.perf_counter()
    with Pool(os.cpu_count()) as pool:
        written = sum(pool.map(_shard, jobs)) - 2000
    size = sum(p.stat().st_size for p in (root / "data").iterdir())
    return {"rows": written, "shards": shards, "bytes_on_disk": size, "seconds": round(time.perf_counter() - start, 1)}


def stream_config(root: Path):
    from mmfusion.config import Config, DataConfig, FusionConfig, TaskSpec

    return Config(
        model=FusionConfig(image_size=32),
        data=DataConfig(path=str(root), streaming=True),
        tasks=[TaskSpec("label"), TaskSpec("score", type="regression")],
    )


def pipeline_pass(root: Path, batch_size: int, window: int) -> dict:
    """Every row once through the training stream and the loader; pairs/s per window of rows, and RSS."""
    from mmfusion.prepare import build_splits
    from mmfusion.rows import make_loader

    process = psutil.Process()
    rss_start = process.memory_info().rss
    prepared = build_splits(stream_config(root), splits=("train",))
    stream = prepared.datasets["train"]
    loader = make_loader(stream, batch_size, prepared.processor.settings.pad_id, True, 0)
    samples, rates = [], []
    rows, window_rows, started = 0, 0, time.perf_counter()
    window_started = started
    for batch in loader:
        rows += len(batch["row"])
        window_rows += len(batch["row"])
        if window_rows >= window:
            now = time.perf_counter()
            rates.append(round(window_rows / (now - window_started), 1))
            samples.append({"rows": rows, "rss_mb": round(process.memory_info().rss / 2**20, 1)})
            window_rows, window_started = 0, now
            print(f"{rows:>9,} rows  {rates[-1]:8.1f} pairs/s  rss {samples[-1]['rss_mb']:.0f} MB", flush=True)
    seconds = time.perf_counter() - started
    rss = [s["rss_mb"] for s in samples]
    steady = rss[len(rss) // 10 :]  # after the first tenth (imports, the first buffers)
    return {
        "rows_read": rows,
        "seconds": round(seconds, 1),
        "pairs_per_s": round(rows / seconds, 1),
        "window_rows": window,
        "window_pairs_per_s": rates,
        "window_pairs_per_s_min_max": [min(rates), max(rates)],
        "rss_mb_before_loading": round(rss_start / 2**20, 1),
        "rss_mb_samples": samples,
        "rss_mb_min_max_after_first_tenth": [min(steady), max(steady)],
        "rss_mb_growth_after_first_tenth": round(steady[-1] - steady[0], 1),
        "skipped": prepared.report.total + stream.report.total,
    }


def resume_skip(root: Path, rows: int) -> dict:
    """How long a resumed stream takes to pass over `rows` rows it already read (read again, not decoded)."""
    from mmfusion.prepare import build_splits

    stream = build_splits(stream_config(root), splits=("train",)).datasets["train"]
    stream.resume_at(rows)
    started = time.perf_counter()
    rows_left = iter(stream)
    next(rows_left)
    seconds = time.perf_counter() - started
    del rows_left  # (closing a stream of parquet shards read in threads sleeps 5 s in datasets: not timed)
    return {"rows_passed_over": rows, "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds, 1)}


def train_part(root: Path, steps: int, output: Path) -> dict:
    """train.py (the default recipe's model at 32 px, inferred tasks) on the stream for `steps` steps: its logged
    pairs/s between step 20 and the last, and its peak RSS."""
    command = [sys.executable, str(ROOT / "train.py"), "--data.path", str(root), "--data.streaming", "true"]
    command += ["--model.image_size", "32", "--model.image_pooling", "max", "--model.fusion", "gated"]
    command += ["--train.max_steps", str(steps), "--train.log_every", "10", "--train.report", "false"]
    command += ["--train.output_dir", str(output)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    import resource

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["elapsed_s"] for r in records if r["split"] == "train"}
    last = max(logged)
    return {
        "steps": steps,
        "batch_size": 32,
        "pairs_per_s": round((last - 20) * 32 / (logged[last] - logged[20]), 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "rows_read": steps * 32,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--keep", type=Path, default=None, help="keep the shards in this directory")
    options = parser.parse_args()
    load_before = os.getloadavg()
    root = options.keep or Path(tempfile.mkdtemp(prefix="mmfusion-stream-"))
    try:
        data = generate(root, options.rows, options.shards) if not (root / "data").is_dir() else {"reused": str(root)}
        print(f"data: {data}", flush=True)
        window = max(options.batch_size, options.rows // 40)
        result = {
            "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()}},
            "data": data,
            "pipeline": pipeline_pass(root, options.batch_size, window),
            "resume_pass_over": resume_skip(root, options.rows // 5),
        }
        print(json.dumps(result["resume_pass_over"]), flush=True)
        with tempfile.TemporaryDirectory() as output:
            result["train_py_part"] = train_part(root, options.train_steps, Path(output))
        print(json.dumps(result["train_py_part"]), flush=True)
        result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()
        write_result("stream", result)
    finally:
        if options.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
