"""Activation checkpointing: recompute a layer's activations in backward instead of storing them.

full / every_n checkpoint whole layers (only their inputs are kept). selective checkpoints every layer but keeps
the outputs of the expensive ops (matmuls, attention) through torch's selective-checkpoint contexts, so backward
recomputes only the cheap elementwise ops between them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from fsdp_kit.errors import ConfigError
from fsdp_kit.policies.config import ActivationCheckpointConfig, CheckpointMode
from fsdp_kit.torch_private import CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper

_aten = torch.ops.aten
SAVED_OPS: frozenset = frozenset(
    getattr(_aten, name).default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(_aten, name)
)
"""What ac=selective keeps: the outputs of these ops (the planner counts the same outputs)."""


def _selective_policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context() -> tuple:
    """The (forward, recompute) context pair that makes a checkpoint keep the SAVED_OPS outputs."""
    return create_selective_checkpoint_contexts(_selective_policy)


def checkpointed_indices(cfg: ActivationCheckpointConfig, layer_count: int) -> list[int]:
    """Which of ``layer_count`` layers (in module order) are checkpointed; the planner asks the same question.
    With mode=selective every layer is, and keeps its matmul outputs."""
    if cfg.mode == CheckpointMode.auto:
        raise ConfigError(
            "ac=auto was not resolved to a concrete mode before use",
            "resolve it with fsdp_kit.plan.choose_checkpointing (the trainer does this)",
        )
    if cfg.mode == CheckpointMode.none:
        return []
    stride = cfg.every_n if cfg.mode == CheckpointMode.every_n else 1
    return list(range(0, layer_count, stride))


def apply_checkpointing(
    model: nn.Module, cfg: ActivationCheckpointConfig, layer_cls: tuple[type[nn.Module], ...]
) -> int:
    """Wrap the chosen layers in non-reentrant checkpoint wrappers; returns how many were wrapped."""
    layers = [module for module in model.modules() if isinstance(module, layer_cls)] if layer_cls else []
    chosen = {id(layers[index]) for index in checkpointed_indices(cfg, len(layers))}
    if not chosen:
        return 0
    # Selective checkpointing exists only for the non-reentrant implementation; HF T5 needs use_cache=False
    # with it (models.build sets that).
    extra: dict[str, Any] = {"context_fn": selective_context} if cfg.mode == CheckpointMode.selective else {}
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **extra
        ),
        check_fn=lambda module: id(module) in chosen,
    )
    return len(chosen)
