"""Ceilings of the suite: per set and task, the primary metric that a perfect model, the image alone and the text
alone reach on the test split.

Each prediction is Bayes-optimal given the generator's latents. Perfect: the clean label (label noise keeps it below
1). A modality that determines the label ("all") predicts the clean label too; one that says nothing predicts the
prior; otherwise it predicts the posterior given its sufficient statistic (`Task.image`/`Task.text`), estimated on a
Monte Carlo sample of the generator's (scene, query) draws: class probabilities (the better of argmax and drawing a
class from them decides; see `score`), per-label probabilities, or the mean. Scores are mmfusion.metrics' own
(macro-F1, mAP, R2) on the written test labels (noise included, nulls skipped). Matching (recall@1 over the split's
true pairs): a perfect model is mean(1 / pairs sharing the pair's key), since pairs with the same key look alike;
either modality alone 1/N.

    python benchmarks/suite/ceilings.py [--only NAME ...] [--samples 50000] [--scale 1.0]

Writes benchmarks/results/suite_ceilings.json (with the machine and versions) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: `suite` and common.py

from mmfusion.config import TaskSpec
from mmfusion.metrics import PRIMARY_METRIC, TaskMetrics
from suite.base import Row, SetSpec, Task
from suite.sets import SETS

VIEWS = ("perfect", "image", "text")
SAMPLING_DRAWS = 10


def encode(task: Task, value) -> np.ndarray | float:
    """A clean label as a prediction: one-hot (classification), multi-hot (multilabel) or the number."""
    if task.type == "regression":
        return float(value)
    vector = np.zeros(len(task.classes))
    vector[[task.classes.index(v) for v in (value if task.type == "multilabel" else [value])]] = 1.0
    return vector


def predictor(task: Task, view, side: int, latents: list[tuple]):
    """(scene, query) -> prediction for `view` of the scene (side 0) or the query (side 1): "all" the clean
    label, else the Monte Carlo posterior mean given the view's statistic (None: the prior)."""
    if view == "all":
        return lambda scene, query: encode(task, task.label(scene, query))
    statistic = view or (lambda _: None)
    sums, counts = defaultdict(float), Counter()
    for pair in latents:
        key = statistic(pair[side])
        sums[key] = sums[key] + encode(task, task.label(*pair))
        counts[key] += 1
    prior = sum(sums.values()) / len(latents)
    means = {key: sums[key] / counts[key] for key in sums}
    return lambda scene, query: means.get(statistic((scene, query)[side]), prior)


def metric(task: Task, outputs: torch.Tensor, target: torch.Tensor) -> float:
    """mmfusion's primary metric of the task (outputs as its head would give them)."""
    metrics = TaskMetrics(TaskSpec(task.name, task.type, labels=[str(c) for c in task.classes] or None))
    metrics.update(outputs, target, torch.ones(len(target), dtype=torch.bool))
    return metrics.compute()[PRIMARY_METRIC[task.type][0]]


def score(task: Task, predictions: list, labels: list) -> float:
    """The primary metric of `predictions` against the written labels. Classification: the better of two
    decision rules on the posterior, its argmax (best accuracy) and a class drawn from it (mean of
    SAMPLING_DRAWS seeded draws), which has the higher macro-F1 where the posterior is flat."""
    if task.type == "regression":
        return metric(task, torch.tensor(predictions), torch.tensor(labels, dtype=torch.float64))
    p = torch.tensor(np.stack(predictions)).clamp(1e-6, 1 - 1e-6)
    target = torch.tensor(np.stack([encode(task, v) for v in labels]))
    if task.type == "multilabel":
        return metric(task, p.log() - (1 - p).log(), target)
    target = target.argmax(-1)
    generator = torch.Generator().manual_seed(0)
    drawn = [
        metric(
            task,
            torch.nn.functional.one_hot(torch.multinomial(p, 1, generator=generator)[:, 0], p.shape[-1]).double().log(),
            target,
        )
        for _ in range(SAMPLING_DRAWS)
    ]
    return max(metric(task, p.log(), target), float(np.mean(drawn)))


def task_ceilings(task: Task, rows: list[Row], latents: list[tuple]) -> dict:
    """The task's primary metric for a perfect model, the image alone and the text alone, on `rows`."""
    result = {"type": task.type, "needs": task.needs, "metric": PRIMARY_METRIC[task.type][0]}
    if task.type == "matching":
        pairs = [row for row in rows if task.column is None or row.record[task.column] is True]
        keys = Counter(task.key(row.scene, row.query) for row in pairs)
        perfect = float(np.mean([1 / keys[task.key(row.scene, row.query)] for row in pairs]))
        chance = 1 / len(pairs)
        return {**result, "count": len(pairs), "perfect": perfect, "image": chance, "text": chance}
    labelled = [row for row in rows if row.record[task.name] is not None]
    labels = [row.record[task.name] for row in labelled]
    result["count"] = len(labelled)
    for view, source, side in zip(VIEWS, ("all", task.image, task.text), (0, 0, 1)):
        predict = predictor(task, source, side, latents)
        result[view] = score(task, [predict(row.scene, row.query) for row in labelled], labels)
    return result


def set_ceilings(spec: SetSpec, scale: float = 1.0, samples: int = 50_000) -> dict:
    """Ceilings of every task of `spec` on its test split at `scale`, posteriors from `samples` latent draws."""
    rows = [spec.make_row("test", index, render=False) for index in range(spec.sizes(scale)["test"])]
    latents = spec.latents(samples, seed=1000)
    return {
        "summary": spec.module.SUMMARY,
        "image_size": spec.image_size,
        "sizes": spec.sizes(scale),
        "text_column": spec.text_column,
        "tasks": {task.name: task_ceilings(task, rows, latents) for task in spec.tasks},
    }


def markdown(sets: dict) -> str:
    lines = ["| set | task | type | needs | metric | perfect | image only | text only | test rows |", "|" + "---|" * 9]
    for name, result in sets.items():
        for task, c in result["tasks"].items():
            figures = " | ".join(f"{c[view]:.3f}" for view in VIEWS)
            lines.append(f"| {name} | {task} | {c['type']} | {c['needs']} | {c['metric']} | {figures} | {c['count']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(SETS), help="just these sets")
    parser.add_argument("--samples", type=int, default=50_000, help="latent draws for the posteriors")
    parser.add_argument("--scale", type=float, default=1.0, help="row-count scale of the test split measured")
    args = parser.parse_args(argv)
    sets = {name: set_ceilings(SETS[name], args.scale, args.samples) for name in args.only or SETS}
    from common import write_result

    command = " ".join(["python benchmarks/suite/ceilings.py", *(sys.argv[1:] if argv is None else argv)])
    method = " ".join(__doc__.split("\n\n")[1].split())
    write_result(
        "suite_ceilings",
        {"command": command, "method": method, "samples": args.samples, "scale": args.scale, "sets": sets},
    )
    print(markdown(sets))


if __name__ == "__main__":
    main()
