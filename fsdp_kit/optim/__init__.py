"""Optimizers (AdamW, AnyPrecisionAdamW) and learning-rate schedules."""

from typing import TYPE_CHECKING

from fsdp_kit._lazy import export_lazily

__all__ = ["AnyPrecisionAdamW", "build_optimizer", "build_schedule"]

# Imported on first use (fsdp_kit/_lazy.py): optim.config alone must not import torch or transformers.
export_lazily(__name__, {"AnyPrecisionAdamW": "anyprecision", "build_optimizer": "build", "build_schedule": "build"})

if TYPE_CHECKING:
    from fsdp_kit.optim.anyprecision import AnyPrecisionAdamW
    from fsdp_kit.optim.build import build_optimizer, build_schedule
