"""mmfusion: multimodal (image + text) fusion models with several task heads."""

__version__ = "0.2.0"

from .config import Config, DataConfig, FusionConfig, TaskSpec, TrainConfig  # noqa: E402
from .data import load_splits  # noqa: E402
from .fusions import FusedOutput  # noqa: E402
from .layers import EncoderOutput  # noqa: E402
from .model import FusionModel, FusionOutput  # noqa: E402
from .predictor import Predictor  # noqa: E402
from .processing import FusionProcessor  # noqa: E402
from .trainer import Run, train  # noqa: E402

__all__ = [
    "Config",
    "DataConfig",
    "EncoderOutput",
    "FusedOutput",
    "FusionConfig",
    "FusionModel",
    "FusionOutput",
    "FusionProcessor",
    "Predictor",
    "TaskSpec",
    "Run",
    "TrainConfig",
    "load_splits",
    "train",
]
