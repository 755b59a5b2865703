"""Run by test_train.py under two processes: training with a time limit where the processes' clocks disagree
(process 1 counts 3 s more since the start). Each process writes how many steps it ran and why it stopped."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from accelerate.state import PartialState

from mmfusion import training
from mmfusion.options import parse_args
from mmfusion.trainer import train

if __name__ == "__main__":
    data, output, *common = sys.argv[1:]
    process = int(os.environ["RANK"])  # before train() sets up the process group
    if process == 1:
        elapsed = training.TimeBudget.elapsed
        training.TimeBudget.elapsed = lambda self: elapsed(self) + 3.0
    run = train(parse_args(["--data.path", data, *common, "--train.output_dir", output]))
    Path(output, f"process_{process}.txt").write_text(f"{run.steps} {run.stopped_by}")
    PartialState().destroy_process_group()
