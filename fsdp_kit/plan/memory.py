"""Per-GPU memory of a training step, broken down, from the model's real shapes and the policies.

Assumptions (printed with every plan): FSDP2 keeps sharded gradients in the parameter dtype; optimizer states
follow the optimizer's dtypes; with resharding, two units are unsharded at a time (the running one and the
prefetched next) plus the running unit's full gradient before its reduce-scatter; without resharding
(shard_grad_op, hybrid_shard_zero2, no_shard) every unit stays unsharded from forward to backward. CPU offload
moves parameters, gradients and optimizer states to host memory.

The peak is the larger of two moments: the forward/backward peak (states + unsharded units + activations + the
backward working set) and the optimizer step (states + the optimizer's temporaries: torch's multi-tensor AdamW
allocates one tensor like every parameter shard for sqrt(v); AnyPrecision bounds them to a chunk).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fsdp_kit.config import TrainConfig
from fsdp_kit.optim.anyprecision import CHUNK_NUMEL
from fsdp_kit.optim.config import OptimConfig
from fsdp_kit.plan.activations import ActivationProfile
from fsdp_kit.policies.activation import checkpointed_indices
from fsdp_kit.policies.config import (
    ActivationCheckpointConfig,
    CheckpointMode,
    PrecisionConfig,
    ShardingConfig,
    WrapConfig,
)
from fsdp_kit.policies.precision import compute_dtype, mixed_precision_policy, param_dtype
from fsdp_kit.policies.sharding import reshard_after_forward, shard_group_size
from fsdp_kit.policies.wrapping import fsdp_units

GB = 1e9
# cuBLAS/cuDNN workspaces, NCCL buffers and allocator slack that max_memory_allocated sees; see
# benchmarks/results/plan_vs_measured.md for how this single constant compares with measurements.
WORKSPACE_BYTES = 1.0 * GB
_OPTIM_STATE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from the model: parameter count and the sizes of the FSDP units."""

    params: int
    largest_unit: int
    units: int
    regathered: int | None = None
    """Parameters all-gathered a second time for backward when resharding (every unit but the root and, unless
    sharding.reshard_last_unit, the last one: policies/apply.py keeps those unsharded); None: all of them."""

    @classmethod
    def of(
        cls, model: nn.Module, *, wrap: WrapConfig, reshard_last_unit: bool, layer_cls: tuple[type[nn.Module], ...]
    ) -> ModelShape:
        units = fsdp_units(model, wrap, layer_cls)
        unit_params = [sum(p.numel() for p in unit.parameters()) for unit in units]
        total = sum(p.numel() for p in model.parameters())
        root = total - sum(unit_params)
        regathered = sum(unit_params) - (unit_params[-1] if unit_params and not reshard_last_unit else 0)
        return cls(total, max([root, *unit_params]), len(units) + 1, regathered)


@dataclass(frozen=True)
class MemoryBreakdown:
    params: float
    grads: float
    optimizer: float
    unsharded_units: float
    activations: float
    workspace: float
    optimizer_step: float = 0.0
    """The optimizer's temporaries during its step, when activations and unsharded units are gone."""

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.workspace

    @property
    def total(self) -> float:
        """The peak: the larger of forward/backward and the optimizer step."""
        return self.states + max(self.unsharded_units + self.activations, self.optimizer_step)

    def as_gb(self) -> dict[str, float]:
        return {**{k: v / GB for k, v in asdict(self).items()}, "total": self.total / GB}


def shard_factor(sharding: ShardingConfig, world_size: int, gpus_per_node: int) -> int:
    """Over how many ranks parameters, gradients and optimizer states are divided (the mesh's shard dim)."""
    return shard_group_size(sharding, world_size, gpus_per_node or world_size)


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def precision_bytes(precision: PrecisionConfig) -> tuple[int, int, int]:
    """Bytes per element of (master parameters and gradients, compute copies, gradient reductions)."""
    compute = dtype_bytes(compute_dtype(precision))
    reduce_dtype = mixed_precision_policy(precision).reduce_dtype
    return (
        dtype_bytes(param_dtype(precision)),
        compute,
        dtype_bytes(reduce_dtype) if reduce_dtype is not None else compute,
    )


def optimizer_bytes_per_param(optim: OptimConfig, precision: PrecisionConfig) -> int:
    if optim.name == "anyprecision":
        states = [optim.momentum_dtype, optim.variance_dtype]
        if optim.use_kahan_summation:
            states.append(optim.compensation_buffer_dtype)
        return sum(_OPTIM_STATE_BYTES[s] for s in states)
    return 2 * dtype_bytes(param_dtype(precision))  # torch AdamW keeps both moments in the parameter dtype


def optimizer_temporaries(job: TrainConfig, shard_params: float) -> float:
    """Bytes the optimizer step allocates on the GPU beyond its states, for ``shard_params`` local elements."""
    if job.sharding.cpu_offload:
        return 0.0  # the step runs on the host
    if job.optim.name == "anyprecision":
        # per chunk: gradients cast to the state dtypes (when they differ) and sqrt(v) in the variance dtype
        grad_bytes = dtype_bytes(param_dtype(job.precision))
        casts = sum(
            _OPTIM_STATE_BYTES[d]
            for d in (job.optim.momentum_dtype, job.optim.variance_dtype)
            if _OPTIM_STATE_BYTES[d] != grad_bytes
        )
        return min(CHUNK_NUMEL, shard_params) * (casts + _OPTIM_STATE_BYTES[job.optim.variance_dtype])
    if job.optim.fused:
        return 0.0
    return shard_params * dtype_bytes(param_dtype(job.precision))  # foreach: sqrt(exp_avg_sq) for all at once


def checkpointed_layers(ac: ActivationCheckpointConfig, layer_count: int) -> set[int]:
    return set(checkpointed_indices(ac, layer_count))


def breakdown(
    job: TrainConfig, shape: ModelShape, activations: ActivationProfile, batch: int, world_size: int, gpus_per_node: int
) -> MemoryBreakdown:
    factor = shard_factor(job.sharding, world_size, gpus_per_node)
    pbytes, cbytes, rbytes = precision_bytes(job.precision)
    on_gpu = 0.0 if job.sharding.cpu_offload else 1.0
    params = on_gpu * shape.params * pbytes / factor
    grads = on_gpu * shape.params * pbytes / factor
    if job.trainer.grad_accum_no_sync and job.trainer.grad_accum > 1 and factor > 1:
        grads += shape.params * cbytes  # every rank accumulates the whole, unsharded gradient between syncs
    optimizer = on_gpu * shape.params * optimizer_bytes_per_param(job.optim, job.precision) / factor
    if factor == 1 and cbytes == pbytes and not job.sharding.cpu_offload:
        unsharded = 0.0  # nothing to gather: the "unsharded" parameters are the parameters themselves
    elif reshard_after_forward(job.sharding):
        unsharded = (min(2, shape.units) * cbytes + rbytes) * shape.largest_unit
    else:
        unsharded = shape.params * cbytes + shape.largest_unit * rbytes
    checkpointed = checkpointed_layers(job.ac, len(activations.per_layer))
    selective = job.ac.mode == CheckpointMode.selective
    act = batch * (
        activations.saved(checkpointed, selective) + activations.backward_working_set(checkpointed, selective)
    )
    step = optimizer_temporaries(job, shape.params / factor)
    return MemoryBreakdown(params, grads, optimizer, unsharded, act, WORKSPACE_BYTES, step)
