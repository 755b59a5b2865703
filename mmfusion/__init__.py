"""mmfusion: multimodal (image + text) fusion models with several task heads."""

__version__ = "0.2.0"

import importlib  # noqa: E402

from .config import Config, DataConfig, FusionConfig, TaskSpec, TrainConfig  # noqa: E402

# Names whose modules import torch, datasets or pandas: loaded on first use, so `import mmfusion` (and every
# command's --help) starts without them.
_LAZY = {
    "EncoderOutput": "layers",
    "FusedOutput": "fusions",
    "FusionModel": "model",
    "FusionOutput": "model",
    "FusionProcessor": "processing",
    "Predictor": "predictor",
    "Run": "loop",
    "evaluate": "predictor",
    "load_splits": "data",
    "train": "trainer",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["Config", "DataConfig", "FusionConfig", "TaskSpec", "TrainConfig", *_LAZY]
