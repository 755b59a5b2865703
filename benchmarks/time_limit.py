"""How well `--train.time_limit` keeps its promise: train.py's whole run (start-up to report) against the limit.

    python benchmarks/time_limit.py                          # clutter (3,000 train rows), limits 60 and 180 s
    python benchmarks/time_limit.py --set glyphs --limits 120 --extra --model.fusion cross_attention

For each limit: the wall clock of the train.py process, its overshoot in percent, the steps planned at the first
plan and at the last, the steps run, and the best checkpoint's test metrics; written to
benchmarks/results/time_limit.json with the machine, the versions and the load average around each run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import ROOT, timed_train, without_bookkeeping, write_result
from suite import generate


def one_run(tasks_yaml: Path, limit: float, extra: list[str], output_dir: Path) -> dict:
    command = [sys.executable, "train.py", "--config", str(tasks_yaml), "--train.time_limit", str(limit), *extra]
    run = timed_train(command, output_dir)
    history = run.pop("history")
    plans = [event for event in history.events if event["event"] == "time_limit_plan"]
    return {
        "limit_s": limit,
        **run,
        "overshoot_percent": round(100 * (run["wall_s"] - limit) / limit, 2),
        "first_plan_steps": plans[0]["planned_steps"] if plans else None,
        "last_plan_steps": plans[-1]["planned_steps"] if plans else None,
        "steps": history.train[-1]["step"],
        "stopped_by_guard": any(event["event"] == "time_limit" for event in history.events),
        "test": without_bookkeeping(history.test),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="clutter", help="a benchmark suite set (benchmarks/suite)")
    parser.add_argument("--suite", default=str(ROOT / "runs" / "suite"), help="where the suite sets are generated")
    parser.add_argument("--limits", type=float, nargs="+", default=[60, 180])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py options")
    args = parser.parse_args()
    tasks_yaml = generate(args.set, args.suite) / "tasks.yaml"
    runs = []
    for limit in args.limits:
        with tempfile.TemporaryDirectory() as directory:
            runs.append(one_run(tasks_yaml, limit, args.extra, Path(directory) / "run"))
        print({k: runs[-1][k] for k in ("limit_s", "wall_s", "overshoot_percent", "steps", "stopped_by_guard")})
    write_result("time_limit", {"set": args.set, "extra_options": args.extra, "runs": runs})


if __name__ == "__main__":
    main()
