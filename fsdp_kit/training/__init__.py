"""The training loop (``Trainer``) and held-out evaluation (``Evaluator``)."""

from fsdp_kit.training.evaluator import Evaluator
from fsdp_kit.training.trainer import FitResult, Trainer, TrainParts

__all__ = ["Evaluator", "FitResult", "TrainParts", "Trainer"]
