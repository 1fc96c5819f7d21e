"""The training loop (``Trainer``) and held-out evaluation (``Evaluator``)."""

from typing import TYPE_CHECKING

from fsdp_kit._lazy import export_lazily

__all__ = ["Evaluator", "FitResult", "TrainParts", "Trainer"]

# Imported on first use (fsdp_kit/_lazy.py): training.config alone must not import torch.
export_lazily(__name__, {"Evaluator": "evaluator", "FitResult": "trainer", "TrainParts": "trainer",
                         "Trainer": "trainer"})

if TYPE_CHECKING:
    from fsdp_kit.training.evaluator import Evaluator
    from fsdp_kit.training.trainer import FitResult, Trainer, TrainParts
