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

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

from fsdp_kit.config import ShardingConfig

_RESHARD_AFTER_FORWARD = {
    "full_shard": True,
    "shard_grad_op": False,
    "hybrid_shard": True,
    "hybrid_shard_zero2": False,
    "no_shard": False,
}


def mesh_layout(cfg: ShardingConfig, world_size: int, local_world_size: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Mesh shape and dim names for ``cfg`` at this world size."""
    if cfg.strategy in ("full_shard", "shard_grad_op"):
        return (world_size,), ("shard",)
    shard = 1 if cfg.strategy == "no_shard" else (cfg.shard_group_size or local_world_size)
    return (world_size // shard, shard), ("replicate", "shard")


def reshard_after_forward(cfg: ShardingConfig) -> bool:
    return _RESHARD_AFTER_FORWARD[cfg.strategy]


def offload_policy(cfg: ShardingConfig) -> OffloadPolicy:
    # Pinned host memory speeds up host<->GPU copies; it needs a GPU to exist.
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload else OffloadPolicy()
