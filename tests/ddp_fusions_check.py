"""Run by test_train.py under two processes: train.py trains and evaluates every fusion with summed losses and
with GradNorm, a few steps each, in one launch (DDP fails at the second step if any parameter got no gradient)."""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState, PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from mmfusion.fusions import FUSIONS  # noqa: E402
from mmfusion.options import parse_args  # noqa: E402

if __name__ == "__main__":
    data, output, *common = sys.argv[1:]
    for fusion in sorted(FUSIONS):
        for weighting in ("sum", "gradnorm"):
            AcceleratorState._reset_state()
            GradientState._reset_state()
            args = ["--data.path", data, *common, "--model.fusion", fusion, "--train.loss_weighting", weighting]
            if train.run(parse_args([*args, "--train.output_dir", f"{output}/{fusion}-{weighting}"])) != 0:
                sys.exit(f"{fusion} + {weighting} failed")
            PartialState().print(f"two processes: {fusion} + {weighting} trained and evaluated")
    PartialState().destroy_process_group()
