"""Activation checkpointing: recompute a layer's activations in backward instead of storing them."""

from __future__ import annotations

import functools
import itertools

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from fsdp_kit.config import ActivationCheckpointConfig


def apply_checkpointing(model: nn.Module, cfg: ActivationCheckpointConfig,
                        layer_cls: tuple[type[nn.Module], ...]) -> int:
    """Wrap the chosen layers in non-reentrant checkpoint wrappers; returns how many were wrapped."""
    if cfg.mode == "none":
        return 0
    layers = [module for module in model.modules() if isinstance(module, layer_cls)]
    stride = cfg.every_n if cfg.mode == "every_n" else 1
    chosen = {id(layer) for layer in itertools.islice(layers, 0, None, stride)}
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: id(module) in chosen,
    )
    return len(chosen)
