"""``fsdp-kit plan``: before renting GPUs, how much memory per GPU, what batch fits, what step time to expect."""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_kit import models
from fsdp_kit.config import TrainConfig
from fsdp_kit.errors import ConfigError
from fsdp_kit.metrics.flops import FlopCounter
from fsdp_kit.plan.activations import ActivationProfile, profile
from fsdp_kit.plan.memory import GB, MemoryBreakdown, ModelShape, breakdown
from fsdp_kit.plan.speed import SpeedEstimate, estimate_speed
from fsdp_kit.policies.precision import compute_dtype

__all__ = ["Plan", "make_plan"]


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


def _batch_shapes(job: TrainConfig, encoder_decoder: bool, batch: int) -> dict[str, tuple[int, ...]]:
    src, tgt = job.data.max_source_len, job.data.max_target_len
    if encoder_decoder:
        return {"input_ids": (batch, src), "attention_mask": (batch, src), "decoder_input_ids": (batch, tgt),
                "labels": (batch, tgt)}
    return {"input_ids": (batch, src + tgt), "attention_mask": (batch, src + tgt), "labels": (batch, src + tgt)}


def make_plan(job: TrainConfig) -> Plan:
    """Plan ``job`` on ``job.cluster`` (cluster.nodes x cluster.gpus_per_node GPUs, one process each)."""
    cluster = job.cluster
    if not cluster.gpus_per_node or not cluster.gpu_memory_gb:
        raise ConfigError(f"cluster={cluster.name} describes no GPUs to plan for",
                          "pick a GPU preset: cluster=p4d|p4de|p5|h100|h200, or set cluster.gpus_per_node and "
                          "cluster.gpu_memory_gb")
    world = cluster.nodes * cluster.gpus_per_node
    job.validated(world)
    config = models.hf_config(job.model)
    model = models.build(job.model, device="meta", dtype=compute_dtype(job.precision), config=config)
    layer_cls = models.layer_classes(model, job.wrap.layer_cls)
    shape = ModelShape.of(model, job, layer_cls)
    acts: ActivationProfile = profile(model, layer_cls, _batch_shapes(job, config.is_encoder_decoder, 2), samples=2)

    def memory(batch: int) -> MemoryBreakdown:
        return breakdown(job, shape, acts, batch, world, cluster.gpus_per_node)

    capacity = cluster.gpu_memory_gb * GB
    max_batch = 0
    while memory(max_batch + 1).total <= capacity and max_batch < 4096:
        max_batch += 1
    flops = FlopCounter(job.model, config).flops_for_shapes(_batch_shapes(job, config.is_encoder_decoder, 1))
    speed = estimate_speed(job, shape, flops, job.trainer.batch_size, world) if cluster.peak_tflops else None
    return Plan(job, world, cluster.gpu_memory_gb, shape, memory(job.trainer.batch_size), max_batch, speed)
