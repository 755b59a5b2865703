"""Multi-task learning on the bundled sample data: one model per task against one shared model per loss
weighting, with and without deep supervision, 3 seeds each, compared by delta-m (Maninis et al. 2019).
Every model is the default recipe (configs/default.yaml, or another fusion with --fusion); the shared models also
carry its `pair` matching task; single-task and deep-supervision models sum their losses.

    python benchmarks/mtl.py [--epochs 3] [--seeds 0 1 2] [--only sum pcgrad ...] [--fusion bilinear]

Every model is reported by its best checkpoint (chosen on validation) on the test split; delta-m is the mean over
tasks of the relative change of the task's test metrics against its single-task model, signed so that higher is
better (in %); std is the sample std over seeds. Writes benchmarks/results/mtl_FUSION.json and mtl_FUSION.md, then
mtl.json and mtl.md, which gather every fusion benchmarked so far.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml
from common import RESULTS, ROOT, mean_std, train_run, write_result

from mmfusion.config import TaskSpec
from mmfusion.metrics import delta_m
from mmfusion.weighting import WEIGHTINGS

TASKS = [
    TaskSpec("area", "regression"),
    TaskSpec("background", "classification"),
    TaskSpec("colors", "multilabel"),
    TaskSpec("match", "classification"),
    TaskSpec("tone", "classification"),
]
PRIMARY = {"area": "r2", "background": "macro_f1", "colors": "map", "match": "macro_f1", "tone": "macro_f1"}


def recipe() -> dict:
    return yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())


def task_config(scratch: Path, name: str, tasks: list[dict]) -> Path:
    """The default recipe (configs/default.yaml) with other tasks, their losses summed."""
    values = recipe()
    path = scratch / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**values, "tasks": tasks, "train": {**values["train"], "loss_weighting": "sum"}}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--only",
        nargs="*",
        choices=[*WEIGHTINGS, "deep_supervision"],
        help="multi-task variants to run (the single-task baselines always run)",
    )
    parser.add_argument("--fusion", help="another fusion than the recipe's, for every model (results get its name)")
    parser.add_argument(
        "--runs",
        type=Path,
        help="one line per finished run (default: results/NAME_runs.jsonl); "
        "runs already there are reused, so an interrupted benchmark continues",
    )
    options = parser.parse_args()
    name = f"mtl_{options.fusion or recipe()['model']['fusion']}"
    options.runs = options.runs or RESULTS / f"{name}_runs.jsonl"
    variants = {f"single: {t.name}": [{"name": t.name, "type": t.type}] for t in TASKS}
    for variant in options.only or [*WEIGHTINGS, "deep_supervision"]:
        if variant != "deep_supervision":
            variants[variant] = variant
    if not options.only or "deep_supervision" in options.only:
        variants["sum + deep supervision"] = [
            {**t, "depths": [0, 1]} if t["type"] != "matching" else t for t in recipe()["tasks"]
        ]
    results: dict[str, list[dict]] = {}
    finished = read_runs(options.runs, options.epochs)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        fusion = ["--model.fusion", options.fusion] if options.fusion else []
        for variant, spec in variants.items():
            args = ["--train.epochs", str(options.epochs), *fusion]
            if isinstance(spec, str):
                args += ["--train.loss_weighting", spec]
            else:
                config = task_config(scratch, variant.replace(": ", "-").replace(" ", "_"), spec)
                args = ["--config", str(config), *args]
            results[variant] = []
            for seed in options.seeds:
                run = finished.get((variant, seed))
                if run is None:
                    run = train_run([*args, "--train.seed", str(seed)], scratch / f"run-{len(results)}-{seed}")
                    with options.runs.open("a") as runs:
                        runs.write(json.dumps({"name": variant, "seed": seed, "epochs": options.epochs, **run}) + "\n")
                results[variant].append(run)
                summary, step_s = run["test"]["summary"], run["train_s_per_step"]
                print(f"{variant} seed {seed}: summary {summary:.3f}, {step_s:.3f} s/step", flush=True)
    rows = summarise(results, options.seeds)
    table = markdown(rows)
    print(table)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    write_result(name, {"settings": {**vars(options), "runs": str(options.runs.relative_to(ROOT))}, "rows": rows})
    write_summary()


def write_summary() -> None:
    """results/mtl.json and mtl.md: the results of every fusion benchmarked so far (each mtl_FUSION.json)."""
    parts = {
        path.stem.removeprefix("mtl_"): json.loads(path.read_text()) for path in sorted(RESULTS.glob("mtl_*.json"))
    }
    write_result(
        "mtl",
        {"fusions": {fusion: {"settings": part["settings"], "rows": part["rows"]} for fusion, part in parts.items()}},
    )
    sections = [f"## {fusion} fusion\n\n{markdown(part['rows'])}\n" for fusion, part in parts.items()]
    (RESULTS / "mtl.md").write_text("\n".join(sections))


def read_runs(path: Path, epochs: int) -> dict[tuple[str, int], dict]:
    """Runs finished earlier with the same number of epochs, by (variant, seed)."""
    if not path.exists():
        return {}
    runs = [json.loads(line) for line in path.read_text().splitlines()]
    # runs recorded before test metrics were (validation only) are run again
    return {(r.pop("name"), r.pop("seed")): r for r in runs if r.pop("epochs") == epochs and "test" in r}


def summarise(results: dict[str, list[dict]], seeds: list[int]) -> dict:
    """Per variant: each task's primary test metric (mean, sample std), delta-m against the single-task models,
    s/step."""
    baselines = [{t.name: results[f"single: {t.name}"][i]["test"][t.name] for t in TASKS} for i in range(len(seeds))]
    rows = {}
    for name, runs in results.items():
        row = {}
        for task, metric in PRIMARY.items():
            values = [r["test"][task][metric] for r in runs if task in r["test"]]
            row[task] = mean_std(values) if values else None
        if not name.startswith("single"):
            # seed i of the shared model against seed i of the single-task models
            row["delta_m"] = mean_std([delta_m(r["test"], baselines[i], TASKS) for i, r in enumerate(runs)])
            # the single-task `match` model stays at chance, which dominates delta-m; this one leaves it out
            others = [t for t in TASKS if t.name != "match"]
            row["delta_m_without_match"] = mean_std(
                [delta_m(r["test"], baselines[i], others) for i, r in enumerate(runs)]
            )
        row["s_per_step"] = statistics.median(r["train_s_per_step"] for r in runs)  # robust to a run slowed by load
        rows[name] = row
    return rows


def markdown(rows: dict) -> str:
    header = [f"{t} ({m})" for t, m in PRIMARY.items()] + ["delta-m (%)", "delta-m w/o match (%)", "s/step (median)"]
    lines = ["| model | " + " | ".join(header) + " |", "|" + " --- |" * (len(PRIMARY) + 4)]
    for name, row in rows.items():
        cells = [f"{row[t][0]:.3f} ± {row[t][1]:.3f}" if row[t] else "" for t in PRIMARY]
        deltas = [
            f"{row[k][0]:+.2f} ± {row[k][1]:.2f}" if k in row else "(baseline)"
            for k in ("delta_m", "delta_m_without_match")
        ]
        lines.append(f"| {name} | " + " | ".join(cells + deltas) + f" | {row['s_per_step']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
