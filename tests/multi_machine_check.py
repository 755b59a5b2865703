"""Run by test_multi_machine.py on each of two "machines" (two `accelerate launch --num_machines 2` on 127.0.0.1):
train.py as usual, and every process also writes the weights it ended with, so the test can compare the machines."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from mmfusion.loop import Loop  # noqa: E402

if __name__ == "__main__":
    weights, *args = sys.argv[1:]
    finish = Loop.finish

    def finish_and_keep_weights(loop: Loop):
        state = loop.accelerator.unwrap_model(loop.model).state_dict()
        tensors = {name: tensor.detach().clone(memory_format=torch.contiguous_format) for name, tensor in state.items()}
        save_file(tensors, f"{weights}/process{loop.accelerator.process_index}.safetensors")
        return finish(loop)

    Loop.finish = finish_and_keep_weights
    sys.exit(train.main(args))
