"""Where train.py waits for the GPU: every host-device synchronization in its loop, counted by source line.

    python benchmarks/host_syncs.py [--steps 60] [--mixed-precision bf16] [--loss-weighting gradnorm]

Runs train.py (the default recipe, no evaluation or saving inside the window) under
torch.cuda.set_sync_debug_mode("warn"), which warns at each operation that makes the host wait for the GPU, and
counts the warnings by the line that raised them. A line with about one sync per step is a per-step stall; the goal
is none outside logging. Without a CUDA device it says so and skips.
Writes benchmarks/results/host_syncs_PRECISION_gpu.json.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import warnings

import torch
from common import ROOT, write_result

sys.path.insert(0, str(ROOT))
import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--loss-weighting", default="gradnorm")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device on this machine: host-device synchronizations do not exist on CPU, skipped")
        return
    os.environ["ACCELERATE_MIXED_PRECISION"] = options.mixed_precision
    far = str(10 * options.steps)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        code = train.main(
            [
                "--train.max_steps",
                str(options.steps),
                "--train.log_every",
                str(options.log_every),
                "--train.eval_every",
                far,
                "--train.save_every",
                far,
                "--train.report",
                "false",
                "--train.loss_weighting",
                options.loss_weighting,
                "--train.output_dir",
                out,
            ]
        )
        torch.cuda.set_sync_debug_mode("default")
    assert code == 0
    syncs = collections.Counter(
        f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )
    rows = [{"where": where, "count": count, "per_step": count / options.steps} for where, count in syncs.most_common()]
    print(f"{sum(syncs.values())} synchronizations in {options.steps} steps (logging every {options.log_every}):")
    for row in rows:
        print(f"  {row['count']:5d} ({row['per_step']:.2f}/step)  {row['where']}")
    write_result(f"host_syncs_{options.mixed_precision}", {"settings": vars(options), "rows": rows})


if __name__ == "__main__":
    main()
