"""Training and evaluation: `train(load_config("small", {...}))`."""

from cbam.training.config import TrainConfig, load_config
from cbam.training.evaluate import EvalMetrics, evaluate
from cbam.training.trainer import TrainingDiverged, TrainResult, train

__all__ = [
    "EvalMetrics",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "evaluate",
    "load_config",
    "train",
]
