"""The default recipe on a suite set under a wall-clock budget, as a user runs it: `accelerate launch train.py
--config SET/tasks.yaml --train.time_limit SECONDS`, timed from the launch to the end of the report.

    python benchmarks/default_budget.py                          # clutter (3,000 training rows), 600 s
    python benchmarks/default_budget.py --set glyphs --time-limit 300
    python benchmarks/default_budget.py --train-args "--train.loss_weighting nll" --name default_budget_nll

Writes benchmarks/results/default_budget.json (or NAME.json): the wall clock against the limit, the steps, the
test metrics of best/ beside the set's ceilings (results/suite_ceilings.json) and, when benchmarks/recipes.py has
run, the default recipe's test metrics at the study's shorter budget; the load average before and after (a time
budget makes the figures depend on it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml
from common import RESULTS, ROOT, timed_train, write_result
from suite import SETS, generate

from mmfusion.metrics import PRIMARY_METRIC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="clutter", choices=list(SETS))
    parser.add_argument("--time-limit", type=float, default=600)
    parser.add_argument("--suite", type=Path, default=ROOT / "runs" / "suite", help="where the suite's sets are")
    parser.add_argument("--train-args", default="", help="train.py options added to the command (one string)")
    parser.add_argument("--name", default="default_budget", help="results/NAME.json")
    options = parser.parse_args()
    config = generate(options.set, options.suite) / "tasks.yaml"
    command = [
        "accelerate",
        "launch",
        "train.py",
        "--config",
        str(config),
        "--train.time_limit",
        f"{options.time_limit:g}",
        *options.train_args.split(),
    ]
    with tempfile.TemporaryDirectory() as scratch:
        run = timed_train(command, Path(scratch) / "run")
    history = run.pop("history")
    ceilings = json.loads((RESULTS / "suite_ceilings.json").read_text())["sets"][options.set]["tasks"]
    study = json.loads((RESULTS / "recipes.json").read_text()) if (RESULTS / "recipes.json").exists() else {}
    at_study_budget = study.get("sets", {}).get(options.set, {}).get("rows", {}).get("default", {})
    tasks = {}
    for task in yaml.safe_load(config.read_text())["tasks"]:
        name, metric = task["name"], PRIMARY_METRIC[task["type"]][0]
        tasks[name] = {
            "metric": metric,
            "test": history.test[name][metric],
            "perfect": ceilings[name]["perfect"],
            "image_only": ceilings[name]["image"],
            "text_only": ceilings[name]["text"],
            "study": at_study_budget.get(name, {}).get("mean"),
        }
    result = {
        "command": " ".join(command),
        "set": options.set,
        "time_limit_s": options.time_limit,
        **run,
        "overshoot": round(run["wall_s"] / options.time_limit - 1, 4),
        "steps": history.train[-1]["step"],
        "events": [e for e in history.events if e["event"] != "time_limit_plan"],
        "study_time_limit_s": study.get("settings", {}).get("time_limit") if at_study_budget else None,
        "tasks": tasks,
    }
    write_result(options.name, result)
    print(
        f"{options.set}, {options.time_limit:g} s: {run['wall_s']:.0f} s wall clock "
        f"({100 * result['overshoot']:+.1f} %), {result['steps']} steps, load average "
        f"{run['load_average_before'][0]:.1f} -> {run['load_average_after'][0]:.1f}"
    )
    print("| task | metric | test | perfect | image only | text only | at the study's budget |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in tasks.items():
        study_cell = f"{row['study']:.3f}" if row["study"] is not None else ""
        print(
            f"| {name} | {row['metric']} | {row['test']:.3f} | {row['perfect']:.3f} | {row['image_only']:.3f} "
            f"| {row['text_only']:.3f} | {study_cell} |"
        )


if __name__ == "__main__":
    main()
