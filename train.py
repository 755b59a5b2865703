"""Fine-tune a multimodal fusion model with accelerate.

    accelerate launch train.py                                        # the bundled sample data
    accelerate launch train.py --config configs/x.yaml --model.fusion gated --train.lr 3e-4
    accelerate launch --mixed_precision bf16 train.py --data.path my_data/ --train.output_dir runs/mine

`python train.py --help` lists every option. Outputs go to --train.output_dir: config.yaml, metrics.jsonl,
checkpoints/step_N/ (training state for --train.resume), best/ and final/ (from_pretrained directories).
The loop itself is `mmfusion.train` (mmfusion/trainer.py), which Python users call directly.
"""

from __future__ import annotations

import sys
import time

START = time.perf_counter()  # --train.time_limit counts from here, imports included


def main(argv: list[str] | None = None, start: float | None = None) -> int:
    """Parse the options (--help and bad ones exit here, before the heavy imports), train, end the processes."""
    from mmfusion.options import parse_args

    config = parse_args(argv)
    from accelerate.state import PartialState

    code = run(config, start)
    PartialState().destroy_process_group()  # the script's end; train() itself leaves the process group to callers
    return code


def run(config, start: float | None = None) -> int:
    """Train, printing input errors and stops as one line; the exit code (0 done, 1 stopped, 2 bad input)."""
    from mmfusion.errors import CheckpointWriteError, InputError
    from mmfusion.trainer import train

    try:
        train(config, start=start)
    except InputError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except (FloatingPointError, CheckpointWriteError) as error:
        print(f"train.py: stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(start=START))
