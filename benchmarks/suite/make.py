"""Write the suite's datasets: one directory per set with train/validation/test and tasks.yaml.

    python benchmarks/suite/make.py [--out runs/suite] [--only NAME ...] [--scale 1.0]

A set already written with the same version, seed and scale is left alone. Prints rows, seconds and size per set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, where the `suite` package lives

from suite.sets import SETS, generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/suite", help="directory that receives one folder per set")
    parser.add_argument("--only", nargs="+", choices=sorted(SETS), help="generate just these sets")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every split's row count (e.g. 0.1)")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale must be > 0, got {args.scale}")
    print("| set | rows | seconds | MB | tasks.yaml |\n|---|---|---|---|---|")
    for name in args.only or SETS:
        start = time.perf_counter()
        path = generate(name, args.out, args.scale)
        seconds = time.perf_counter() - start
        rows = sum(SETS[name].sizes(args.scale).values())
        megabytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
        print(f"| {name} | {rows} | {seconds:.1f} | {megabytes:.1f} | {path / 'tasks.yaml'} |", flush=True)


if __name__ == "__main__":
    main()
