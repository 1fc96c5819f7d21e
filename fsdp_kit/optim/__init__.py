"""Optimizers (AdamW, AnyPrecisionAdamW) and learning-rate schedules."""

from fsdp_kit.optim.anyprecision import AnyPrecisionAdamW
from fsdp_kit.optim.build import build_optimizer, build_schedule

__all__ = ["AnyPrecisionAdamW", "build_optimizer", "build_schedule"]
