"""Optimizer and learning-rate schedule from config."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_scheduler

from fsdp_kit.optim.anyprecision import AnyPrecisionAdamW
from fsdp_kit.optim.config import OptimConfig
from fsdp_kit.training.config import TrainerConfig

_SCHEDULES = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "anyprecision":
        return AnyPrecisionAdamW(
            params,
            lr=cfg.lr,
            betas=(cfg.betas[0], cfg.betas[1]),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            use_kahan_summation=cfg.use_kahan_summation,
            momentum_dtype=getattr(torch, cfg.momentum_dtype),
            variance_dtype=getattr(torch, cfg.variance_dtype),
            compensation_buffer_dtype=getattr(torch, cfg.compensation_buffer_dtype),
            chunk_elements=cfg.chunk_elements,
        )
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=cfg.fused,
    )


def build_schedule(optimizer: Optimizer, cfg: TrainerConfig) -> LRScheduler:
    """Linear warmup, then cosine (to ``min_lr_ratio`` of the peak), linear (to 0) or constant."""
    kwargs = {"min_lr_rate": cfg.min_lr_ratio} if cfg.lr_schedule == "cosine" else None
    return get_scheduler(
        _SCHEDULES[cfg.lr_schedule],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
        scheduler_specific_kwargs=kwargs,
    )
