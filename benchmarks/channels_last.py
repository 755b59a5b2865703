"""NCHW against channels_last (NHWC) for every CNN image-encoder family, training and inference, side by side.

    python benchmarks/channels_last.py

Each model: the encoder + lstm + concat; simple_cnn at 64 px and batch 32, the torchvision CNNs at 128 px and
batch 8 (random weights: no download). Pairs/s are the best of 3 steps after a warm-up. This decides
FusionModel's default layout (channels_last for CNNs). Writes benchmarks/results/channels_last.json.
"""

from __future__ import annotations

import torch
from common import best_seconds, write_result

from mmfusion import FusionConfig, FusionModel, TaskSpec

TASKS = [TaskSpec("topic", "classification", num_labels=5), TaskSpec("score", "regression")]
ENCODERS = [
    ("simple_cnn", 64, 32),
    ("resnet18", 128, 8),
    ("efficientnet_b0", 128, 8),
    ("convnext_tiny", 128, 8),
    ("resnet50", 128, 8),
]


def pairs_per_s(encoder: str, size: int, batch_size: int, channels_last: bool, device: torch.device) -> dict:
    torch.manual_seed(0)
    config = FusionConfig(
        image_encoder=encoder, text_encoder="lstm", fusion="concat", vocab_size=1000, image_size=size, tasks=TASKS
    )
    model = FusionModel(config).to(device).use_channels_last(channels_last)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, size, size, device=device),
        "input_ids": torch.randint(1, 1000, (batch_size, 24), device=device),
        "attention_mask": torch.ones(batch_size, 24, dtype=torch.long, device=device),
        "labels": {
            "topic": torch.randint(0, 5, (batch_size,), device=device),
            "score": torch.randn(batch_size, device=device),
        },
    }
    optimizer = torch.optim.AdamW(model.parameters())

    def train():
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer():
        model.eval()
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})

    result = {}
    for mode, step in (("train", train), ("inference", infer)):
        step()
        result[mode] = batch_size / best_seconds(step, 3, device)
    return result


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for encoder, size, batch_size in ENCODERS:
        nchw = pairs_per_s(encoder, size, batch_size, False, device)
        nhwc = pairs_per_s(encoder, size, batch_size, True, device)
        rows.append(
            {
                "encoder": encoder,
                "image_size": size,
                "batch": batch_size,
                "nchw": nchw,
                "channels_last": nhwc,
                "train_ratio": nhwc["train"] / nchw["train"],
                "inference_ratio": nhwc["inference"] / nchw["inference"],
            }
        )
        print(
            f"{encoder:>16} {size} px b{batch_size}: training {nchw['train']:7.1f} -> {nhwc['train']:7.1f} pairs/s "
            f"({rows[-1]['train_ratio']:.2f}x), inference {nchw['inference']:7.1f} -> {nhwc['inference']:7.1f} "
            f"({rows[-1]['inference_ratio']:.2f}x)"
        )
    write_result("channels_last", {"rows": rows})


if __name__ == "__main__":
    main()
