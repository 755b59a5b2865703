"""Quality of every fusion on the bundled sample data (3 seeds), next to image-only and text-only baselines.

    python benchmarks/fusions.py [--epochs 4] [--seeds 0 1 2] [--loss-weighting sum]

Each run is `train.py` on data/sample (the default recipe; losses summed unless --loss-weighting) with one fusion;
the table gives each task's primary test metric of the best checkpoint (chosen on validation; mean +- sample std
over seeds), the summary, and the time to reach the best checkpoint. Writes benchmarks/results/fusions.json and
fusions.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, mean_std, train_run, write_result

sys.path.insert(0, str(ROOT))
from mmfusion.fusions import FUSIONS  # noqa: E402

TASKS = {"area": "r2", "background": "macro_f1", "colors": "map", "match": "macro_f1", "tone": "macro_f1"}
VARIANTS = {
    **{f: ["--model.fusion", f] for f in FUSIONS},
    "image only (concat)": ["--model.fusion", "concat", "--train.without", "text"],
    "text only (concat)": ["--model.fusion", "concat", "--train.without", "image"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--loss-weighting", default="sum", help="train.loss_weighting of every run")
    options = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, args in VARIANTS.items():
            if options.only and name not in options.only:
                continue
            runs = []
            for seed in options.seeds:
                out = Path(scratch) / f"{name.split()[0]}-{seed}"
                settings = ["--train.epochs", str(options.epochs), "--train.loss_weighting", options.loss_weighting]
                runs.append(train_run([*args, *settings, "--train.seed", str(seed)], out))
                print(
                    f"{name} seed {seed}: test summary {runs[-1]['test']['summary']:.3f} in {runs[-1]['wall_s']:.0f}s"
                )
            rows[name] = summarise(runs)
    table = markdown(rows)
    print(table)
    (RESULTS / "fusions.md").write_text(table + "\n")
    write_result("fusions", {"settings": vars(options), "rows": rows})


def summarise(runs: list[dict]) -> dict:
    row = {task: mean_std([r["test"][task][metric] for r in runs]) for task, metric in TASKS.items()}
    row["summary"] = mean_std([r["test"]["summary"] for r in runs])
    row["time_to_best_s"] = mean_std([r["time_to_best_s"] for r in runs])
    row["s_per_step"] = mean_std([r["train_s_per_step"] for r in runs])
    return row


def markdown(rows: dict) -> str:
    header = "| fusion | " + " | ".join(f"{t} ({m})" for t, m in TASKS.items()) + " | summary | time to best (s) |"
    lines = [header, "|" + " --- |" * (len(TASKS) + 3)]
    for name, row in rows.items():
        cells = [f"{row[t][0]:.3f} ± {row[t][1]:.3f}" for t in [*TASKS, "summary"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['time_to_best_s'][0]:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
