"""Start-up time of the command-line entry points: `mmfusion --help` and `python train.py --help`.

    python benchmarks/startup.py --label before     # then, after a change:
    python benchmarks/startup.py --label after

Each command runs in a fresh process (this checkout's mmfusion first on PYTHONPATH) once to warm the file cache,
then `--repeats` times; the figure is the best wall-clock time, since noise on a shared machine only slows a run.
Results go to benchmarks/results/startup.json under the label, beside those of earlier labels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, environment

COMMANDS = {
    "mmfusion --help": [str(Path(sys.executable).with_name("mmfusion")), "--help"],
    "python train.py --help": [sys.executable, str(ROOT / "train.py"), "--help"],
}


def wall_seconds(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="key of this measurement in startup.json, e.g. before/after")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    figures = {}
    for name, command in COMMANDS.items():
        wall_seconds(command)
        times = [wall_seconds(command) for _ in range(args.repeats)]
        figures[name] = {"best_s": round(min(times), 3), "all_s": [round(t, 3) for t in times]}
        print(f"{name:<28} best {min(times):.2f} s of {args.repeats}")
    path = RESULTS / "startup.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    load = os.getloadavg()[0]  # other work on a shared machine slows every start
    results[args.label] = {
        "environment": environment(),
        "load_average": load,
        "repeats": args.repeats,
        "commands": figures,
    }
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
