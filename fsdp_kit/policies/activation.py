"""Activation checkpointing: recompute a layer's activations in backward instead of storing them."""

from __future__ import annotations

import functools

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from fsdp_kit.policies.config import ActivationCheckpointConfig, CheckpointMode


def checkpointed_indices(cfg: ActivationCheckpointConfig, layer_count: int) -> list[int]:
    """Which of ``layer_count`` layers (in module order) are checkpointed; the planner asks the same question."""
    if cfg.mode == CheckpointMode.none:
        return []
    stride = cfg.every_n if cfg.mode == CheckpointMode.every_n else 1
    return list(range(0, layer_count, stride))


def apply_checkpointing(model: nn.Module, cfg: ActivationCheckpointConfig,
                        layer_cls: tuple[type[nn.Module], ...]) -> int:
    """Wrap the chosen layers in non-reentrant checkpoint wrappers; returns how many were wrapped."""
    layers = [module for module in model.modules() if isinstance(module, layer_cls)] if layer_cls else []
    chosen = {id(layers[index]) for index in checkpointed_indices(cfg, len(layers))}
    if not chosen:
        return 0
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: id(module) in chosen,
    )
    return len(chosen)
