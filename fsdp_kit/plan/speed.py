"""Step time from compute and FSDP communication volume.

Compute: counted model FLOPs per GPU divided by a per-GPU TFLOPS: measured, where benchmarks/results/ holds a run
of the same model and recipe on the same GPU, else an assumed fraction of the GPU's dense peak (bf16, or fp32 for
precision=fp32; stated), plus the forward recomputed under activation checkpointing (a third of a layer's
forward+backward FLOPs per checkpointed layer; selective recomputes only elementwise ops, counted as free) and
times the compile speed-up measured on record (1 without one). CPU offload adds the host<->GPU copies of the
parameter and gradient shards over PCIe (PCIE_GB_S), not overlapped; the host optimizer step is not modeled. Traffic per
GPU and step: all-gather of the parameters in forward, again in backward when resharding, reduce-scatter of the
gradients; hybrid sharding adds an all-reduce of the sharded gradients across replicas. Collectives inside a node
run at NVLink speed; a group that spans nodes runs at the node's aggregate network bandwidth (ring bus bandwidth). FSDP
prefetches, so collectives overlap compute: the estimate gives full overlap (max) and none (sum).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsdp_kit.config import TrainConfig
from fsdp_kit.plan.memory import ModelShape, dtype_bytes, precision_bytes, shard_factor
from fsdp_kit.plan.records import RESULTS, load_records
from fsdp_kit.policies.activation import checkpointed_indices
from fsdp_kit.policies.config import CheckpointMode, Precision
from fsdp_kit.policies.precision import param_dtype
from fsdp_kit.policies.sharding import reshard_after_forward

ASSUMED_MFU = 0.35
PCIE_GB_S = 25.0
"""Host<->GPU copy bandwidth per GPU with CPU offload (PCIe 4.0 x16 in practice)."""


@dataclass(frozen=True)
class SpeedEstimate:
    tflops_per_gpu: float
    tflops_source: str
    compute_s: float
    comm_gb_per_gpu: float
    comm_s: float
    step_s_overlapped: float
    step_s_serial: float
    tokens_per_s: float


def _same_gpu(job: TrainConfig, record: dict[str, Any]) -> bool:
    gpu = (job.cluster.gpu or "").split("-")[0].lower()
    return bool(gpu) and gpu in str(record.get("device", "")).lower()


def measured_tflops(job: TrainConfig, results: Path | list[dict[str, Any]] = RESULTS) -> tuple[float, str] | None:
    """Median model TFLOPS of the matching runs on record (model, precision, AC, compile and GPU)."""
    records = load_records(results) if isinstance(results, Path) else results
    found = sorted((float(r["tflops"]), str(r.get("source", "?"))) for r in records
                   if r.get("model") == job.model.name and r.get("precision") == job.precision.name
                   and r.get("ac") == job.ac.mode and bool(r.get("compile")) == job.trainer.compile
                   and r.get("tflops") and _same_gpu(job, r))
    return found[len(found) // 2] if found else None


def compile_speedup(job: TrainConfig, records: list[dict[str, Any]]) -> tuple[float, str]:
    """Median ratio of compiled to uncompiled TFLOPS over pairs on record that differ only in compile."""
    key = ("model", "precision", "ac", "batch", "device")
    plain = {tuple(r.get(k) for k in key): float(r["tflops"]) for r in records if not r.get("compile")
             and r.get("tflops")}
    ratios = sorted(float(r["tflops"]) / plain[tuple(r.get(k) for k in key)] for r in records
                    if r.get("compile") and r.get("tflops") and tuple(r.get(k) for k in key) in plain)
    if not ratios:
        return 1.0, "compile speed-up: none on record, assumed 1x"
    return ratios[len(ratios) // 2], f"compile speed-up {ratios[len(ratios) // 2]:.2f}x (median of {len(ratios)} " \
                                     "measured pairs)"


def recompute_fraction(job: TrainConfig, layer_count: int) -> float:
    """Extra FLOPs of activation checkpointing, as a fraction of the step's model FLOPs."""
    if job.ac.mode in (CheckpointMode.none, CheckpointMode.selective) or not layer_count:
        return 0.0
    return len(checkpointed_indices(job.ac, layer_count)) / layer_count / 3.0


def _bandwidth_gb_s(job: TrainConfig, group_spans_nodes: bool) -> float:
    cluster = job.cluster
    nvlink = cluster.intra_node_gbps or 100.0
    if not group_spans_nodes:
        return nvlink
    # A ring crossing nodes pushes the whole buffer through each node's network once (NCCL spreads its channels
    # over all of the node's NICs), so the bus bandwidth is the node's aggregate network bandwidth.
    network = (cluster.inter_node_gbps or 100.0) / 8.0
    return min(nvlink, network)


def estimate_speed(job: TrainConfig, shape: ModelShape, flops_per_sample: int, batch: int,
                   world: int, layer_count: int = 0, records: list[dict[str, Any]] | None = None) -> SpeedEstimate:
    cluster = job.cluster
    records = load_records() if records is None else records
    measured = measured_tflops(job, records)
    if measured:
        tflops, source = measured[0], f"measured ({measured[1]})"
    else:
        fp32 = job.precision.name == Precision.fp32
        peak = (cluster.peak_tflops_fp32 or (cluster.peak_tflops or 0.0) / 16) if fp32 else cluster.peak_tflops or 0.0
        speedup, speedup_text = compile_speedup(job, records) if job.trainer.compile else (1.0, "")
        recompute = recompute_fraction(job, layer_count)
        tflops = ASSUMED_MFU * peak * speedup / (1.0 + recompute)
        source = (f"assumed {ASSUMED_MFU:.0%} of the {peak:g} TFLOPS {'fp32' if fp32 else 'bf16'} peak"
                  + (f", {recompute:.0%} recompute" if recompute else "")
                  + (f", {speedup_text}" if speedup_text else "")
                  + "; no measurement on record")
    compute_s = flops_per_sample * batch / (tflops * 1e12)

    factor = shard_factor(job, world, cluster.gpus_per_node)
    replicas = world // factor
    _, cbytes, rbytes = precision_bytes(job)
    regathered = (shape.params if shape.regathered is None else shape.regathered) \
        if reshard_after_forward(job.sharding) else 0
    shard_traffic = ((shape.params + regathered) * cbytes + shape.params * rbytes) * (factor - 1) / factor
    replica_traffic = 2 * shape.params / factor * rbytes * (replicas - 1) / replicas if replicas > 1 else 0.0
    shard_spans_nodes = factor > cluster.gpus_per_node
    replicas_span_nodes = replicas > 1 and world > cluster.gpus_per_node
    comm_s = (shard_traffic / (_bandwidth_gb_s(job, shard_spans_nodes) * 1e9)
              + replica_traffic / (_bandwidth_gb_s(job, replicas_span_nodes) * 1e9))
    offload_s = 0.0
    if job.sharding.cpu_offload:  # parameter shards up, gradient shards down, every step
        offload_s = 2 * shape.params / factor * dtype_bytes(param_dtype(job.precision)) / (PCIE_GB_S * 1e9)
    overlapped = max(compute_s, comm_s) + offload_s
    tokens = batch * world * (job.data.max_source_len + job.data.max_target_len)
    return SpeedEstimate(tflops, source, compute_s, (shard_traffic + replica_traffic) / 1e9, comm_s, overlapped,
                         compute_s + comm_s + offload_s, tokens / overlapped)
