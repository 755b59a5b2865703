"""Dense tasks on the bundled sample data (configs/sample_dense.yaml): one model per task against one shared model
with the dense and the per-pair tasks (summed losses, GradNorm), compared by delta-m; and what the decoder costs
per training step.

    python benchmarks/dense.py [--epochs 2] [--seeds 0 1] [--only sum gradnorm] [--parts cost runs recipe]

Protocol as benchmarks/mtl.py: every model is reported by its best checkpoint (chosen on validation) on the test
split; delta-m is the mean over tasks of the relative change of the task's test metrics against its single-task
model of the same seed, signed so that higher is better (in %; per-class IoUs left out); std is the sample std
over seeds. Every model is the sample_dense recipe (text input: the `referral` column). The cost part times
forward + backward + AdamW of that model at batch 32 (best of a few repeats, one thread) with the per-pair tasks
alone, plus each dense head, and with a wider decoder. The recipe part times `accelerate launch train.py --config
configs/sample_dense.yaml` end to end. Writes benchmarks/results/dense.json (the parts run now replace theirs, the
others are kept) and dense.md, and one line per finished run to dense_runs.jsonl (reused, so an interrupted
benchmark continues). The machine's load average is recorded with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
from pathlib import Path

import torch
import yaml
from common import RESULTS, ROOT, best_seconds, mean_std, timed_train, train_run, without_bookkeeping, write_result
from mtl import read_runs

from mmfusion import FusionConfig, FusionModel, TaskSpec
from mmfusion.metrics import delta_m
from mmfusion.runlog import best_record

RECIPE = ROOT / "configs" / "sample_dense.yaml"
PRIMARY = {"shapes": "miou", "object": "miou", "area": "r2", "background": "macro_f1", "colors": "map"}
BATCH = 32


def recipe() -> dict:
    return yaml.safe_load(RECIPE.read_text())


def tasks() -> list[TaskSpec]:
    return [TaskSpec(**values) for values in recipe()["tasks"]]


def variant_config(scratch: Path, name: str, task_list: list[dict], weighting: str) -> Path:
    values = recipe()
    path = scratch / f"{name}.yaml"
    train = {**values["train"], "loss_weighting": weighting}
    path.write_text(yaml.safe_dump({**values, "tasks": task_list, "train": train}))
    return path


def training_runs(options) -> dict:
    """Single-task and shared models, `options.seeds` each: per variant, each task's primary test metric (mean,
    sample std), delta-m against the single-task models and the median step time."""
    specs = recipe()["tasks"]
    variants = {f"single: {t['name']}": ([t], "sum") for t in specs}
    variants.update({f"shared ({w})": (specs, w) for w in options.only})
    results: dict[str, list[dict]] = {}
    finished = read_runs(options.runs, options.epochs)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for variant, (task_list, weighting) in variants.items():
            name = re.sub(r"\W+", "_", variant).strip("_")
            config = variant_config(scratch, name, task_list, weighting)
            results[variant] = []
            for seed in options.seeds:
                run = finished.get((variant, seed))
                if run is None:
                    args = ["--config", str(config), "--train.epochs", str(options.epochs), "--train.seed", str(seed)]
                    load = os.getloadavg()
                    run = {**train_run(args, scratch / f"{name}-{seed}"), "load_average_before": load}
                    with options.runs.open("a") as runs:
                        runs.write(json.dumps({"name": variant, "seed": seed, "epochs": options.epochs, **run}) + "\n")
                results[variant].append(run)
                print(f"{variant} seed {seed}: test summary {run['test']['summary']:.3f}", flush=True)
    return summarise(results, options.seeds)


def summarise(results: dict[str, list[dict]], seeds: list[int]) -> dict:
    specs = tasks()
    baselines = [{t.name: results[f"single: {t.name}"][i]["test"][t.name] for t in specs} for i in range(len(seeds))]
    rows = {}
    for name, runs in results.items():
        row = {}
        for task, metric in PRIMARY.items():
            values = [r["test"][task][metric] for r in runs if task in r["test"]]
            row[task] = mean_std(values) if values else None
        if not name.startswith("single"):
            row["delta_m"] = mean_std([delta_m(r["test"], baselines[i], specs) for i, r in enumerate(runs)])
            dense = [t for t in specs if t.is_dense]
            row["delta_m_dense"] = mean_std([delta_m(r["test"], baselines[i], dense) for i, r in enumerate(runs)])
        row["s_per_step"] = statistics.median(r["train_s_per_step"] for r in runs)
        row["load_average_before"] = [r.get("load_average_before") for r in runs]
        rows[name] = row
    return rows


def markdown(rows: dict) -> str:
    header = [f"{t} ({m})" for t, m in PRIMARY.items()] + ["delta-m (%)", "delta-m dense tasks (%)", "s/step"]
    lines = ["| model | " + " | ".join(header) + " |", "|" + " --- |" * (len(header) + 1)]
    for name, row in rows.items():
        cells = [f"{row[t][0]:.3f} ± {row[t][1]:.3f}" if row[t] else "" for t in PRIMARY]
        deltas = [
            f"{row[k][0]:+.2f} ± {row[k][1]:.2f}" if k in row else "(baseline)" for k in ("delta_m", "delta_m_dense")
        ]
        lines.append(f"| {name} | " + " | ".join(cells + deltas) + f" | {row['s_per_step']:.3f} |")
    return "\n".join(lines)


# ----- the decoder's cost -----


def step_cost(task_list: list[TaskSpec], repeats: int, **model_options) -> dict:
    """Parameters and the best forward + backward + AdamW time of the recipe's model with `task_list`."""
    config = FusionConfig(**{**recipe()["model"], **model_options}, vocab_size=200, tasks=task_list)
    torch.manual_seed(0)
    model = FusionModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    labels = {}
    for spec in task_list:
        if spec.type == "segmentation":
            labels[spec.name] = torch.randint(0, spec.num_labels, (BATCH, 64, 64), generator=generator)
        elif spec.type == "classification":
            labels[spec.name] = torch.randint(0, spec.num_labels, (BATCH,), generator=generator)
        elif spec.type == "multilabel":
            labels[spec.name] = torch.randint(0, 2, (BATCH, spec.num_labels), generator=generator).float()
        else:
            labels[spec.name] = torch.rand(BATCH, generator=generator)
    batch = {
        "pixel_values": torch.randn(BATCH, 3, 64, 64, generator=generator),
        "input_ids": torch.randint(1, 200, (BATCH, 6), generator=generator),
        "attention_mask": torch.ones(BATCH, 6, dtype=torch.long),
        "labels": labels,
    }

    def step() -> None:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()

    step()
    heads = sum(p.numel() for spec in task_list if spec.is_dense for p in model.heads[spec.name].parameters())
    return {
        "ms_per_step": 1000 * best_seconds(step, repeats, torch.device("cpu")),
        "parameters": model.num_parameters(),
        "dense_head_parameters": heads,
    }


def decoder_cost(repeats: int) -> dict:
    specs = {spec.name: spec for spec in tasks()}
    for spec in specs.values():  # labels as the data would give them
        if spec.type != "regression" and spec.num_labels is None:
            spec.num_labels = {"background": 3, "colors": 7}[spec.name]
    pair = [specs[name] for name in ("area", "background", "colors")]
    width = recipe()["model"]["decoder_dim"]
    variants = {
        "per-pair tasks only": (pair, {}),
        "+ object (1 dense head)": ([*pair, specs["object"]], {}),
        "+ object and shapes (2 dense heads)": ([*pair, specs["object"], specs["shapes"]], {}),
        f"+ both, decoder_dim {2 * width}": ([*pair, specs["object"], specs["shapes"]], {"decoder_dim": 2 * width}),
        "+ both, cross_attention fusion (decoder attends to the text)": (
            [*pair, specs["object"], specs["shapes"]],
            {"fusion": "cross_attention"},
        ),
        "per-pair tasks only, cross_attention fusion": (pair, {"fusion": "cross_attention"}),
    }
    rows = {}
    for name, (task_list, options) in variants.items():
        rows[name] = {**step_cost(task_list, repeats, **options), "load_average": os.getloadavg()}
        print(f"{name}: {rows[name]['ms_per_step']:.0f} ms/step, {rows[name]['parameters']:,} parameters", flush=True)
    return rows


def recipe_run() -> dict:
    """`accelerate launch train.py --config configs/sample_dense.yaml`, timed end to end (start-up to report)."""
    command = ["accelerate", "launch", "train.py", "--config", str(RECIPE.relative_to(ROOT))]
    with tempfile.TemporaryDirectory() as scratch:
        run = timed_train(command, Path(scratch) / "run")
    history = run.pop("history")
    best = best_record(history.validation, "summary")
    return {
        "command": " ".join(command),
        **run,
        "steps": history.train[-1]["step"],
        "train_pairs_per_s": round(history.train[-1]["pairs_per_s"], 1),
        "best_step": best["step"],
        "validation": without_bookkeeping(best),
        "test": without_bookkeeping(history.test),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", default=["sum", "gradnorm"], help="loss weightings of the shared model")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per cost variant (the best counts)")
    parser.add_argument("--parts", nargs="+", choices=["cost", "runs", "recipe"], default=["cost", "runs", "recipe"])
    parser.add_argument("--runs", type=Path, default=RESULTS / "dense_runs.jsonl")
    options = parser.parse_args()
    torch.set_num_threads(1)
    previous = RESULTS / "dense.json"
    result = json.loads(previous.read_text()) if previous.is_file() else {}
    result.pop("environment", None)
    settings = {**vars(options), "runs": str(options.runs.relative_to(ROOT))}
    if "cost" in options.parts:
        result["decoder_cost"] = {"repeats": options.repeats, "rows": decoder_cost(options.repeats)}
    if "runs" in options.parts:
        rows = training_runs(options)
        table = markdown(rows)
        print(table)
        (RESULTS / "dense.md").write_text(table + "\n")
        result["training"] = {"settings": settings, "rows": rows}
    if "recipe" in options.parts:
        result["recipe_run"] = recipe_run()
        print(json.dumps(result["recipe_run"], indent=2))
    write_result("dense", result)


if __name__ == "__main__":
    main()
