"""The default recipe on a suite set under a wall-clock budget, measured as a user runs it: `accelerate launch
train.py --config SET/tasks.yaml --train.time_limit SECONDS`, timed from the launch to the end of the report.

    python benchmarks/default_budget.py                          # clutter (3,000 training rows), 600 s
    python benchmarks/default_budget.py --set glyphs --time-limit 300

Writes benchmarks/results/default_budget.json: the wall clock, the steps, the test metrics of best/ with the set's
ceilings (results/suite_ceilings.json) and, when benchmarks/recipes.py has run, the default recipe's figures at the
study's shorter budget; the load average before and after (the budget makes the figures depend on it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time

import yaml
from common import RESULTS, ROOT, write_result
from suite import SETS, generate

from mmfusion.metrics import PRIMARY_METRIC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="clutter", choices=list(SETS))
    parser.add_argument("--time-limit", type=float, default=600)
    parser.add_argument("--suite", default=str(ROOT / "runs" / "suite"), help="where the suite's sets are")
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "default_budget"))
    options = parser.parse_args()
    config = generate(options.set, options.suite) / "tasks.yaml"
    shutil.rmtree(options.output_dir, ignore_errors=True)
    command = [
        "accelerate",
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "train.py",
        "--config",
        str(config),
        "--train.time_limit",
        f"{options.time_limit:g}",
        "--train.output_dir",
        options.output_dir,
    ]
    load_start, start = os.getloadavg(), time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall_s, load_end = time.perf_counter() - start, os.getloadavg()

    records = [json.loads(line) for line in open(os.path.join(options.output_dir, "metrics.jsonl"))]
    test = json.loads(open(os.path.join(options.output_dir, "test_metrics.json")).read())
    tasks = yaml.safe_load(config.read_text())["tasks"]
    ceilings = json.loads((RESULTS / "suite_ceilings.json").read_text())["sets"][options.set]["tasks"]
    study = json.loads((RESULTS / "recipes.json").read_text()) if (RESULTS / "recipes.json").exists() else None
    study_row = (study or {}).get("sets", {}).get(options.set, {}).get("rows", {}).get("default")
    rows = {}
    for task in tasks:
        metric = PRIMARY_METRIC[task["type"]][0]
        rows[task["name"]] = {
            "metric": metric,
            "test": test[task["name"]][metric],
            "perfect": ceilings[task["name"]]["perfect"],
            "study": study_row[task["name"]]["mean"] if study_row and task["name"] in study_row else None,
        }
    events = [r for r in records if r["split"] == "event"]
    result = {
        "command": " ".join(command),
        "set": options.set,
        "time_limit_s": options.time_limit,
        "wall_s": round(wall_s, 1),
        "overshoot": round(wall_s / options.time_limit - 1, 4),
        "steps": max(r["step"] for r in records),
        "stopped_by": [e["event"] for e in events if e["event"] != "time_limit_plan"],
        "load_start": [round(x, 2) for x in load_start],
        "load_end": [round(x, 2) for x in load_end],
        "study_time_limit_s": study["settings"]["time_limit"] if study_row else None,
        "tasks": rows,
    }
    write_result("default_budget", result)
    print(
        f"{options.set}, {options.time_limit:g} s: {wall_s:.0f} s wall clock ({100 * result['overshoot']:+.1f} %), "
        f"{result['steps']} steps, load {load_start[0]:.1f} -> {load_end[0]:.1f}"
    )
    print("| task | metric | test | perfect | at the study's budget |\n| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        study_cell = f"{row['study']:.3f}" if row["study"] is not None else ""
        print(f"| {name} | {row['metric']} | {row['test']:.3f} | {row['perfect']:.3f} | {study_cell} |")


if __name__ == "__main__":
    main()
