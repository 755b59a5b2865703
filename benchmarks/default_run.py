"""The README's first command, `accelerate launch train.py`, timed end to end: wall clock (start-up to report),
steps and training pairs/s, the best checkpoint's validation metrics (chosen on validation) and its test metrics.

    python benchmarks/default_run.py              # -> benchmarks/results/default_run.json
    python benchmarks/default_run.py --runs 2     # more runs: each one's figures, plus their mean and sample std
    python benchmarks/default_run.py --train-args "--train.loss_weighting nll" --name default_run_nll
    python benchmarks/default_run.py --seeds 0 1 2 --name default_run_seeds  # one run per --train.seed

With several runs the file also holds each validation and test metric's mean and sample std over them.

The machine's load average before and after each run is recorded: on a shared machine it explains slow runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, timed_train, without_bookkeeping, write_result

sys.path.insert(0, str(ROOT))
from mmfusion.runlog import best_record, read_run_config  # noqa: E402


def one_run(output_dir: Path, train_args: list[str]) -> dict:
    """Run the README's command (its output directory moved to `output_dir`) and read what it wrote."""
    command = ["accelerate", "launch", "train.py", *train_args]
    run = timed_train(command, output_dir)
    history = run.pop("history")
    best = best_record(history.validation, read_run_config(output_dir).train.best_metric)
    return {
        "command": " ".join(command),
        **run,
        "steps": history.train[-1]["step"],
        "epochs": history.train[-1]["epoch"] + 1,
        "train_pairs_per_s": round(history.train[-1]["pairs_per_s"], 1),
        "best_step": best["step"],
        "validation": without_bookkeeping(best),
        "test": without_bookkeeping(history.test),
    }


def over_runs(runs: list[dict], split: str, statistic) -> dict:
    """`statistic` of each task's metrics (and the summary score) on `split` over the runs, counts left out."""
    result = {}
    for task, metrics in runs[0][split].items():
        if isinstance(metrics, dict):
            names = [name for name in metrics if name != "count"]
            result[task] = {name: statistic([run[split][task][name] for run in runs]) for name in names}
        else:
            result[task] = statistic([run[split][task] for run in runs])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="runs of the same command (ignored with --seeds)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="one run per seed (`--train.seed S`)")
    parser.add_argument("--train-args", default="", help="train.py options added to the command (one string)")
    parser.add_argument("--name", default="default_run", help="results/NAME.json")
    args = parser.parse_args()
    commands = [[*args.train_args.split(), "--train.seed", str(seed)] for seed in args.seeds]
    runs = []
    for train_args in commands or [args.train_args.split()] * args.runs:
        with tempfile.TemporaryDirectory() as directory:
            runs.append(one_run(Path(directory) / "run", train_args))
        print(json.dumps({k: runs[-1][k] for k in ("wall_s", "steps", "train_pairs_per_s", "best_step")}))
    walls = [run["wall_s"] for run in runs]
    summary = {
        "wall_s_mean": statistics.fmean(walls),
        "wall_s_sample_std": statistics.stdev(walls) if len(walls) > 1 else None,
    }
    if len(runs) > 1:
        for split in ("validation", "test"):
            summary[f"{split}_mean"] = over_runs(runs, split, statistics.fmean)
            summary[f"{split}_sample_std"] = over_runs(runs, split, statistics.stdev)
    write_result(args.name, {"runs": runs, **summary})


if __name__ == "__main__":
    main()
