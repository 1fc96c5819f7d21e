"""Sharding strategies in the FSDP blog's vocabulary, mapped onto FSDP2 meshes and flags.

| strategy           | mesh                               | reshard_after_forward |
|--------------------|------------------------------------|-----------------------|
| full_shard         | 1-D (shard over all ranks)         | True                  |
| shard_grad_op      | 1-D                                | False (ZeRO-2)        |
| hybrid_shard       | 2-D (replicate across groups, shard within) | True         |
| hybrid_shard_zero2 | 2-D                                | False                 |
| no_shard           | 2-D with shard size 1 (pure replication, DDP semantics) | False |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsdp_kit.errors import ConfigError
from fsdp_kit.policies.config import ShardingConfig, ShardingStrategy

if TYPE_CHECKING:  # imported where used: config.py's check_shard_group must not import torch
    from torch.distributed.fsdp import OffloadPolicy

_RESHARD_AFTER_FORWARD = {
    ShardingStrategy.full_shard: True,
    ShardingStrategy.shard_grad_op: False,
    ShardingStrategy.hybrid_shard: True,
    ShardingStrategy.hybrid_shard_zero2: False,
    ShardingStrategy.no_shard: False,
}


def shard_group_size(cfg: ShardingConfig, world_size: int, local_world_size: int) -> int:
    """Over how many ranks parameters, gradients and optimizer states are divided (the mesh's shard dim)."""
    if cfg.strategy == ShardingStrategy.no_shard:
        return 1
    if ShardingStrategy(cfg.strategy).is_hybrid:
        return cfg.shard_group_size or local_world_size
    return world_size


def check_shard_group(cfg: ShardingConfig, world_size: int) -> None:
    """Reject a shard group size the mesh cannot be built from, naming the fix."""
    size = cfg.shard_group_size
    if size is None:
        return
    if size <= 0:
        raise ConfigError(f"sharding.shard_group_size={size} must be > 0", "pass a positive shard group size")
    if not ShardingStrategy(cfg.strategy).is_hybrid:
        raise ConfigError(
            f"sharding.shard_group_size={size} only applies to hybrid strategies, not {cfg.strategy}",
            "drop sharding.shard_group_size or use sharding=hybrid_shard",
        )
    if world_size % size:
        raise ConfigError(
            f"world size {world_size} is not divisible by sharding.shard_group_size={size}",
            f"choose a shard_group_size that divides {world_size} (usually the GPUs per node)",
        )


def mesh_layout(cfg: ShardingConfig, world_size: int, local_world_size: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Mesh shape and dim names for ``cfg`` at this world size."""
    if cfg.strategy in (ShardingStrategy.full_shard, ShardingStrategy.shard_grad_op):
        return (world_size,), ("shard",)
    shard = shard_group_size(cfg, world_size, local_world_size)
    return (world_size // shard, shard), ("replicate", "shard")


def reshard_after_forward(cfg: ShardingConfig) -> bool:
    return _RESHARD_AFTER_FORWARD[cfg.strategy]


def offload_policy(cfg: ShardingConfig) -> OffloadPolicy:
    import torch  # late: config.py imports check_shard_group from here, without torch
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    # Pinned host memory speeds up host<->GPU copies; it needs a GPU to exist.
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload else OffloadPolicy()
