"""The policy layer's settings, in the FSDP blog's vocabulary (mapped onto FSDP2 in ``sharding.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_kit.checks import check_fields
from fsdp_kit.options import Option


class Precision(Option):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    bf16_pure = "bf16_pure"


class ShardingStrategy(Option):
    full_shard = "full_shard"
    shard_grad_op = "shard_grad_op"
    hybrid_shard = "hybrid_shard"
    hybrid_shard_zero2 = "hybrid_shard_zero2"
    no_shard = "no_shard"

    @property
    def is_hybrid(self) -> bool:
        return self in (ShardingStrategy.hybrid_shard, ShardingStrategy.hybrid_shard_zero2)


class WrapPolicy(Option):
    transformer = "transformer"
    size = "size"
    none = "none"


class CheckpointMode(Option):
    none = "none"
    selective = "selective"
    every_n = "every_n"
    full = "full"
    auto = "auto"

    @classmethod
    def lightest_first(cls) -> tuple[CheckpointMode, ...]:
        """The concrete modes from least to most recompute (what ``auto`` tries, in order)."""
        return (cls.none, cls.selective, cls.every_n, cls.full)


@dataclass
class PrecisionConfig:
    name: Precision = Precision.fp32
    """fp32 | bf16 (bf16 compute, fp32 weights and reductions) | fp16 (same with a gradient scaler) |
    bf16_pure (weights, grads and compute in bf16; pair with optim=anyprecision)."""


@dataclass
class ShardingConfig:
    strategy: ShardingStrategy = ShardingStrategy.full_shard
    """full_shard | shard_grad_op (ZeRO-2) | hybrid_shard | hybrid_shard_zero2 | no_shard (replicate, DDP-like)."""
    shard_group_size: int | None = None
    """Ranks per shard group for the hybrid strategies; null means the ranks of one node."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer states in pinned CPU memory."""
    reshard_last_unit: bool = False
    """Reshard the last wrapped unit after forward too. Off (torchtitan's choice): backward needs it at once, so
    freeing it would only make FSDP all-gather it again."""
    prefetch: int = 0
    """Transformer units to all-gather ahead explicitly, in forward and backward (FSDP2's
    set_modules_to_forward/backward_prefetch); 0 leaves FSDP2's implicit prefetching. Not yet measured on GPU."""

    def check(self, prefix: str = "sharding.") -> None:
        """Each setting finite and in its range (``prefix``: where this config sits in the job)."""
        check_fields(self, prefix, {"prefetch": ">=0"})


@dataclass
class WrapConfig:
    policy: WrapPolicy = WrapPolicy.transformer
    """transformer (each layer of ``layer_cls`` is its own FSDP unit) | size (group modules bottom-up
    until ``min_num_params``) | none (one unit: the whole model)."""
    layer_cls: list[str] | None = None
    """Class names of the layers to wrap, e.g. [T5Block]; null takes the model's ``_no_split_modules``."""
    min_num_params: int = 100_000_000
    """Size policy: smallest parameter count of a unit."""

    def check(self, prefix: str = "wrap.") -> None:
        """Each setting finite and in its range (``prefix``: where this config sits in the job)."""
        check_fields(self, prefix, {"min_num_params": ">0"})


@dataclass
class ActivationCheckpointConfig:
    mode: CheckpointMode = CheckpointMode.none
    """none | selective (every layer keeps its matmul and attention outputs and recomputes the cheap ops between
    them) | every_n (checkpoint every ``every_n``-th layer) | full (checkpoint every transformer layer) | auto (the
    lightest of none < selective < every_n < full whose planned peak fits the memory, see ``budget_gb``)."""
    every_n: int = 2
    """With mode=every_n: checkpoint one layer in this many."""
    budget_gb: float | None = None
    """With mode=auto: per-device memory (GB) the planned peak must fit in; null takes cluster.gpu_memory_gb,
    else the device's memory (CUDA total memory, or host RAM on CPU)."""

    def check(self, prefix: str = "ac.") -> None:
        """Each setting finite and in its range (``prefix``: where this config sits in the job)."""
        check_fields(self, prefix, {"every_n": ">0", "budget_gb": ">0"})
