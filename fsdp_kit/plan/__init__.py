"""``fsdp-kit plan``: before renting GPUs, how much memory per GPU, what batch fits, what step time to expect.

Everything that depends on the model and the sequence lengths but not on the recipe's batch (the traced
activation profile, the FLOPs per sample) is computed once per (model, lengths, compute dtype) and cached, so
that ``plan --search`` can price hundreds of recipes with arithmetic.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from fsdp_kit.config import TrainConfig
from fsdp_kit.data.config import DataConfig
from fsdp_kit.errors import ConfigError
from fsdp_kit.launch.config import ClusterConfig
from fsdp_kit.metrics.flops import FlopCounter
from fsdp_kit.models.build import build as build_model
from fsdp_kit.models.build import hf_config, layer_classes, traceable
from fsdp_kit.models.config import ModelConfig
from fsdp_kit.plan.activations import ActivationProfile, profile
from fsdp_kit.plan.memory import GB, MemoryBreakdown, ModelShape, breakdown
from fsdp_kit.plan.speed import SpeedEstimate, estimate_speed
from fsdp_kit.plan.work import StepWork, step_work
from fsdp_kit.policies.config import ActivationCheckpointConfig, CheckpointMode, PrecisionConfig, WrapConfig
from fsdp_kit.policies.precision import compute_dtype

__all__ = ["Plan", "Traced", "choose_checkpointing", "make_plan", "resolve_auto_checkpointing", "traced", "traced_work"]

MAX_BATCH = 4096


@dataclass(frozen=True)
class Plan:
    job: TrainConfig
    world_size: int
    gpu_memory_gb: float
    shape: ModelShape
    memory: MemoryBreakdown
    max_batch: int
    speed: SpeedEstimate | None

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu_memory_gb * GB


@dataclass(frozen=True)
class Traced:
    """What the planner needs from one (model, lengths, compute dtype): none of it depends on the batch."""

    activations: ActivationProfile
    flops_per_sample: int
    encoder_decoder: bool


_TRACED: dict[tuple, Traced] = {}
_SHAPES: dict[tuple, ModelShape] = {}
_WORK: dict[tuple, StepWork] = {}


def _batch_shapes(data: DataConfig, encoder_decoder: bool, batch: int) -> dict[str, tuple[int, ...]]:
    src, tgt = data.max_source_len, data.max_target_len
    if encoder_decoder:
        shapes: dict[str, tuple[int, ...]] = {
            "input_ids": (batch, src),
            "attention_mask": (batch, src),
            "decoder_input_ids": (batch, tgt),
            "labels": (batch, tgt),
        }
        if data.packing:  # a packed row is full: max_source_len tokens of text, and its 4-D masks are traced
            shapes.update(segment_ids=(batch, src), decoder_segment_ids=(batch, tgt))
        return shapes
    return {"input_ids": (batch, src + tgt), "attention_mask": (batch, src + tgt), "labels": (batch, src + tgt)}


def _meta_model(
    *, model: ModelConfig, precision: PrecisionConfig, wrap: WrapConfig
) -> tuple[PreTrainedModel, tuple[type[nn.Module], ...]]:
    hf = hf_config(model)
    built = traceable(build_model(model, device="meta", dtype=compute_dtype(precision), config=hf))
    return built, layer_classes(built, wrap.layer_cls)


def _trace_key(*, model: ModelConfig, wrap: WrapConfig, data: DataConfig, precision: PrecisionConfig) -> tuple:
    """What a trace depends on: the model, its layer classes, the lengths and the compute dtype."""
    return (
        repr(model),
        repr(wrap.layer_cls),
        data.max_source_len,
        data.max_target_len,
        compute_dtype(precision),
        data.packing,
    )


def traced(job: TrainConfig) -> Traced:
    """The activation profile and FLOPs of ``job``'s model at ``job.data``'s lengths (cached)."""
    key = _trace_key(model=job.model, wrap=job.wrap, data=job.data, precision=job.precision)
    if key not in _TRACED:
        model, layer_cls = _meta_model(model=job.model, precision=job.precision, wrap=job.wrap)
        enc_dec = bool(model.config.is_encoder_decoder)
        acts = profile(model, layer_cls, _batch_shapes(job.data, enc_dec, 2), samples=2)
        flops = FlopCounter(job.model, model.config).flops_for_shapes(_batch_shapes(job.data, enc_dec, 1))
        _TRACED[key] = Traced(acts, flops, enc_dec)
    return _TRACED[key]


def traced_work(job: TrainConfig) -> StepWork:
    """The GPU work of ``job``'s forward + backward at ``job.data``'s lengths, for the step time (cached; only
    the planner's speed needs it, so training-time planning (ac=auto, the batch search) never traces it)."""
    key = _trace_key(model=job.model, wrap=job.wrap, data=job.data, precision=job.precision)
    if key not in _WORK:
        model, layer_cls = _meta_model(model=job.model, precision=job.precision, wrap=job.wrap)
        enc_dec = bool(model.config.is_encoder_decoder)
        _WORK[key] = step_work(model, layer_cls, lambda batch: _batch_shapes(job.data, enc_dec, batch))
    return _WORK[key]


def model_shape(job: TrainConfig) -> ModelShape:
    """Parameter count and FSDP unit sizes of ``job``'s model under its wrap policy (cached)."""
    key = (repr(job.model), repr(job.wrap), job.sharding.reshard_last_unit)
    if key not in _SHAPES:
        model, layer_cls = _meta_model(model=job.model, precision=job.precision, wrap=job.wrap)
        _SHAPES[key] = ModelShape.of(
            model, wrap=job.wrap, reshard_last_unit=job.sharding.reshard_last_unit, layer_cls=layer_cls
        )
    return _SHAPES[key]


def largest_batch(memory_at: Callable[[int], MemoryBreakdown], capacity: float) -> int:
    """The largest batch whose planned peak fits ``capacity`` bytes (memory grows with the batch)."""
    if memory_at(1).total > capacity:
        return 0
    low, high = 1, 2
    while high <= MAX_BATCH and memory_at(high).total <= capacity:
        low, high = high, high * 2
    high = min(high, MAX_BATCH + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if memory_at(mid).total <= capacity else (low, mid)
    return low


def _world(cluster: ClusterConfig) -> tuple[int, float]:
    """The GPUs of ``cluster`` and the memory of one, in GB."""
    if not cluster.gpus_per_node or not cluster.gpu_memory_gb:
        raise ConfigError(
            f"cluster={cluster.name} describes no GPUs to plan for",
            "pick a GPU preset: cluster=p4d|p4de|p5|h100|h200, or set cluster.gpus_per_node and cluster.gpu_memory_gb",
        )
    return cluster.nodes * cluster.gpus_per_node, cluster.gpu_memory_gb


def choose_checkpointing(
    job: TrainConfig, world_size: int, gpus_per_node: int, budget_bytes: float
) -> tuple[ActivationCheckpointConfig, MemoryBreakdown]:
    """The lightest AC mode (none < selective < every_n < full) whose planned peak at the job's batch fits
    ``budget_bytes``; full when none does (the caller says so)."""
    trace = traced(job)
    shape = model_shape(job)
    for mode in CheckpointMode.lightest_first():
        candidate = dataclasses.replace(job, ac=dataclasses.replace(job.ac, mode=mode))
        memory = breakdown(candidate, shape, trace.activations, job.trainer.batch_size, world_size, gpus_per_node)
        if memory.total <= budget_bytes:
            return candidate.ac, memory
    return candidate.ac, memory


def device_memory_bytes(device: torch.device) -> float:
    """What one rank may use: the CUDA device's total memory, or the host's RAM on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def resolve_auto_checkpointing(
    job: TrainConfig, world_size: int, gpus_per_node: int, device: torch.device
) -> TrainConfig:
    """``job`` with ac=auto replaced by the mode the planner picks (unchanged for any other mode).

    The budget is ac.budget_gb, else cluster.gpu_memory_gb, else this device's memory."""
    if job.ac.mode != CheckpointMode.auto:
        return job
    if job.ac.budget_gb is not None:
        budget = job.ac.budget_gb * GB
    elif job.cluster.gpu_memory_gb:
        budget = job.cluster.gpu_memory_gb * GB
    else:
        budget = device_memory_bytes(device)
    chosen, memory = choose_checkpointing(job, world_size, gpus_per_node, budget)
    if memory.total > budget:  # choose_checkpointing leaves saying so to its caller
        warnings.warn(
            f"ac=auto: no checkpointing mode fits {budget / GB:.2f} GB at trainer.batch_size="
            f"{job.trainer.batch_size} (ac=full is planned at {memory.total / GB:.2f} GB); using ac=full. "
            "Lower trainer.batch_size or shard across more GPUs",
            stacklevel=2,
        )
    return dataclasses.replace(job, ac=chosen)


def make_plan(job: TrainConfig, with_speed: bool = True) -> Plan:
    """Plan ``job`` on ``job.cluster`` (cluster.nodes x cluster.gpus_per_node GPUs, one process each) at
    ``job.data``'s sequence lengths; ``with_speed=False`` plans memory only (no trace of the step's work)."""
    world, gpu_memory_gb = _world(job.cluster)
    job.validated(world, for_training=False)
    cluster = job.cluster
    capacity = gpu_memory_gb * GB
    job = resolve_auto_checkpointing(job, world, cluster.gpus_per_node, torch.device("cpu"))
    trace, shape = traced(job), model_shape(job)

    def memory(batch: int) -> MemoryBreakdown:
        return breakdown(job, shape, trace.activations, batch, world, cluster.gpus_per_node)

    speed = (
        estimate_speed(job, shape, trace.flops_per_sample, job.trainer.batch_size, world, traced_work(job))
        if cluster.peak_tflops and with_speed
        else None
    )
    return Plan(
        job, world, gpu_memory_gb, shape, memory(job.trainer.batch_size), largest_batch(memory, capacity), speed
    )
