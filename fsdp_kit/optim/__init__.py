"""Optimizers (AdamW, AnyPrecisionAdamW) and learning-rate schedules.

This file imports nothing: importing ``fsdp_kit.optim.config`` (what composing a config does) must not import torch
or transformers. Import from the modules: anyprecision (AnyPrecisionAdamW), build (build_optimizer, build_schedule);
config is light.
"""
