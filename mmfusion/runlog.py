"""The run directory train.py writes, read back: `config.yaml`, `metrics.jsonl`, which evaluation is best, a
one-line metrics summary and a short description of a model. The trainer, the CLI, the report and the model card
all use these, so each rule is written once.

metrics.jsonl holds one JSON object per line: `{"step", "epoch", "split": "train"|"validation"|"test"|"event",
...}`. A resumed run appends the steps it repeats; readers keep the last record of each (split, step).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, FusionConfig
from .errors import InputError
from .metrics import LOWER_IS_BETTER

RUN_CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Appends records to metrics.jsonl (on the main process only), each stamped with the seconds since `start`."""

    def __init__(self, run_dir: Path, start: float, writer: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_NAME
        self.start = start
        self.writer = writer

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write(self, record: dict) -> dict:
        record["elapsed_s"] = round(self.elapsed(), 3)
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record


@dataclass
class History:
    """metrics.jsonl by split, one record per step in step order (the last written wins)."""

    train: list[dict]
    validation: list[dict]
    test: dict | None  # the last test record (metrics of the best checkpoint)
    events: list[dict]  # early stopping, time-limit planning


def read_history(run_dir: Path) -> History:
    """Parse RUN_DIR/metrics.jsonl; a line cut short by a crash is left out, a step repeated by a resume keeps its
    last record."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise InputError(f"{path} not found: not a training run directory (train.py writes {METRICS_NAME})")
    by_split: dict[str, dict[int, dict]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "split" in record and "step" in record:
            by_split.setdefault(record["split"], {})[record["step"]] = record
    ordered = {split: [steps[s] for s in sorted(steps)] for split, steps in by_split.items()}
    test = ordered.get("test", [])
    return History(
        ordered.get("train", []), ordered.get("validation", []), test[-1] if test else None, ordered.get("event", [])
    )


def read_run_config(run_dir: Path) -> Config:
    """The run's resolved configuration (RUN_DIR/config.yaml)."""
    from .options import load_yaml

    path = Path(run_dir) / RUN_CONFIG_NAME
    if not path.is_file():
        raise InputError(f"{path} not found: not a training run directory (train.py writes {RUN_CONFIG_NAME})")
    try:
        return load_yaml(path)
    except ValueError as error:
        raise InputError(str(error)) from None


# ----- choosing best -----


def metric_value(metrics: dict, best_metric: str) -> float | None:
    """The value of `best_metric` (`summary` or `task/metric`) in an evaluation's metrics; None if absent."""
    if best_metric == "summary":
        return metrics.get("summary")
    task, _, metric = best_metric.partition("/")
    return (metrics.get(task) or {}).get(metric)


def selection_value(metrics: dict, best_metric: str) -> float | None:
    """What picking best/ maximises: the metric's value, negated where lower is better; None if absent."""
    value = metric_value(metrics, best_metric)
    if value is None:
        return None
    return -value if best_metric.partition("/")[2] in LOWER_IS_BETTER else value


def available_metrics(metrics: dict) -> list[str]:
    """The names `--train.best_metric` accepts for these metrics."""
    names = ["summary"] if "summary" in metrics else []
    for task, values in metrics.items():
        if isinstance(values, dict):
            names += [f"{task}/{name}" for name in values if name != "count"]
    return names


def best_record(validation: list[dict], best_metric: str) -> dict | None:
    """The evaluation saved as best/: the first one with the highest selection value."""
    best, best_value = None, None
    for record in validation:
        value = selection_value(record, best_metric)
        if value is not None and (best_value is None or value > best_value):
            best, best_value = record, value
    return best


# ----- showing -----


def metrics_line(metrics: dict) -> str:
    """`summary S | task: metric v, ...` on one line."""
    parts = [f"summary {metrics['summary']:.4f}"] if "summary" in metrics else []
    for task, values in metrics.items():
        if isinstance(values, dict) and "count" in values:
            shown = [f"{k} {v:.4f}" for k, v in values.items() if k != "count" and isinstance(v, float)]
            parts.append(f"{task}: {', '.join(shown) or 'no labels'}")
    return " | ".join(parts)


def describe_model(config: FusionConfig) -> list[tuple[str, str]]:
    """(part, description) for the image encoder, the text encoder, the fusion and the tasks."""
    image = config.image_encoder + (f" (widths {config.image_widths})" if config.image_encoder == "simple_cnn" else "")
    image += f" {config.image_model}" if config.image_model else ""
    image += f" at {config.image_size} px" + (f", weights {config.image_weights}" if config.image_weights else "")
    image += f", LoRA rank {config.image_lora_rank}" if config.image_lora_rank else ""
    if config.text_encoder == "hf":
        text = f"hf {config.text_model} ({config.text_pooling} pooling)"
        text += f", LoRA rank {config.text_lora_rank}" if config.text_lora_rank else ""
    else:
        direction = ", bidirectional" if config.bidirectional and config.text_encoder in ("lstm", "gru") else ""
        text = f"{config.text_encoder} (dim {config.text_dim}, layers {config.text_layers}{direction})"
    frozen = {True: ", frozen", False: ""}
    heads = f", {config.fusion_heads} heads" if config.fusion == "cross_attention" else ""
    tasks = "; ".join(f"{t.name} ({t.type}{f', {t.num_labels} labels' if t.num_labels else ''})" for t in config.tasks)
    return [
        ("image encoder", image + frozen[config.freeze_image]),
        ("text encoder", text + frozen[config.freeze_text]),
        (
            "fusion",
            f"{config.fusion} (dim {config.dim}, {config.fusion_layers} layers{heads}, dropout {config.dropout:g})",
        ),
        ("tasks", tasks),
    ]
