"""train.py under accelerate's FSDP2 on CPU, for tests: accelerate runs FSDP on accelerators only, so this launcher
relabels the CPU process group (gloo) as a multi-device one before train.py starts; everything after that
(fully_shard, the sharded optimizer, gathered and sharded checkpoints) is accelerate's and torch's FSDP2 code.

    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ... torchrun --nproc_per_node 2 tests/fsdp_launch.py [train.py options]
"""

import sys
from pathlib import Path

import accelerate.state
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
initialise = accelerate.state.PartialState.__init__


def as_multi_device(self, *args, **kwargs):
    initialise(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.MULTI_GPU


accelerate.state.PartialState.__init__ = as_multi_device
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

sys.exit(train.main(sys.argv[1:]))
