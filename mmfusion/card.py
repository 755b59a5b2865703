"""The README.md model card that goes into a checkpoint directory at the end of training."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from . import __version__
from .config import Config
from .metrics import PRIMARY_METRIC


def _metric_rows(metrics: dict | None, config: Config) -> list[str]:
    if not metrics:
        return ["(not measured)"]
    rows = ["| task | metric | value |", "| --- | --- | --- |"]
    for spec in config.tasks:
        for name, value in (metrics.get(spec.name) or {}).items():
            if name != "count" and isinstance(value, float):
                rows.append(f"| {spec.name} | {name} | {value:.4f} |")
    rows.append(f"| all | summary | {metrics['summary']:.4f} |")
    return rows


def model_card(config: Config, sizes: dict[str, int], validation: dict | None, test: dict | None) -> str:
    """Markdown with a Hub metadata header: tasks and labels, architecture, data, metrics, how it was trained."""
    model = config.model
    text_encoder = f"hf ({model.text_model})" if model.text_encoder == "hf" else model.text_encoder
    lines = [
        "---",
        "library_name: mmfusion",
        "tags: [mmfusion, multimodal, image-text]",
        "---",
        "",
        f"# mmfusion model: {model.image_encoder} + {text_encoder}, {model.fusion} fusion",
        "",
        "## Tasks",
        "",
    ]
    for spec in config.tasks:
        primary = PRIMARY_METRIC[spec.type][0]
        if spec.type == "regression":
            detail = f"target mean {spec.target_mean:.4g}, std {spec.target_std:.4g}"
        elif spec.labels:
            detail = f"labels: {', '.join(spec.labels)}"
        else:
            detail = "image-text pairs"
        lines.append(f"- **{spec.name}** ({spec.type}, column `{spec.column}`, primary metric {primary}): {detail}")
    lines += [
        "",
        "## Architecture",
        "",
        f"- image encoder: {model.image_encoder}{f' ({model.image_model})' if model.image_model else ''}"
        f" at {model.image_size} px" + (f" (weights from {model.image_weights})" if model.image_weights else ""),
        f"- text encoder: {text_encoder}, pooling {model.text_pooling}",
        f"- fusion: {model.fusion}, width {model.dim}, {model.fusion_layers} layers",
        "",
        "## Data",
        "",
        f"`{config.data.path}`: " + ", ".join(f"{count:,} {split}" for split, count in sizes.items()) + " pairs",
        "",
        "## Validation metrics (best checkpoint)",
        "",
        *_metric_rows(validation, config),
        "",
        "## Test metrics",
        "",
        *_metric_rows(test, config),
        "",
        "## Training",
        "",
        "```bash",
        "accelerate launch " + shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "```",
        "",
        f"Trained with mmfusion {__version__}. Load it with `FusionModel.from_pretrained` or",
        "`mmfusion.Predictor.from_pretrained`, or predict from the command line:",
        "`mmfusion predict <this directory> --image x.jpg --text ...`.",
        "",
    ]
    return "\n".join(lines)
