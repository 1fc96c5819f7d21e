"""Step time from the traced work of a step (plan/work.py), calibrated efficiencies, and FSDP communication.

Compute: the step's matmul and attention FLOPs (with the forward that activation checkpointing recomputes), the
bytes of its memory-bound ops, the optimizer step (its traffic per element traced on the configured optimizer),
gradient clipping and FSDP's local copies around each collective, and its kernel count, priced by the four
efficiencies of plan/calibration.py (fitted to the GPU runs on record), times the compile speed-up measured on
record (1 without one). CPU offload adds the host<->GPU copies of the parameter and gradient shards over PCIe
(PCIE_GB_S) and the optimizer step on the host (HOST_MEMORY_GB_S), neither overlapped. Traffic per GPU and step:
all-gather of the parameters in forward, again in backward when resharding, reduce-scatter of the gradients; hybrid
sharding adds an all-reduce of the sharded gradients across replicas. Collectives inside a node run at NVLink speed;
a group that spans nodes runs at the node's aggregate network bandwidth (ring bus bandwidth). FSDP prefetches, so
collectives overlap compute: the estimate gives full overlap (max) and none (sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fsdp_kit.config import TrainConfig
from fsdp_kit.optim.build import build_optimizer
from fsdp_kit.plan import calibration as calibration_file
from fsdp_kit.plan.calibration import Calibration, Observation, predict
from fsdp_kit.plan.memory import ModelShape, dtype_bytes, precision_bytes, shard_factor
from fsdp_kit.plan.records import load_records
from fsdp_kit.plan.work import StepWork, Work, optimizer_bytes_per_element
from fsdp_kit.policies.activation import checkpointed_indices
from fsdp_kit.policies.config import CheckpointMode, Precision
from fsdp_kit.policies.precision import param_dtype
from fsdp_kit.policies.sharding import reshard_after_forward

PCIE_GB_S = 25.0
"""Host<->GPU copy bandwidth per GPU with CPU offload (PCIe 4.0 x16 in practice)."""
HOST_MEMORY_GB_S = 25.0
"""Host memory bandwidth per GPU for the optimizer step that CPU offload runs on the host (a node's ~200 GB/s of
DRAM bandwidth shared by 8 GPUs)."""
BYTES_PER_S_PER_FLOPS = 3.35e12 / 989e12
"""HBM bandwidth per dense peak FLOPS of an H100 SXM: the bandwidth assumed for a GPU whose cluster preset gives
none (cluster.memory_bandwidth_gb_s)."""


@dataclass(frozen=True)
class SpeedEstimate:
    tflops_per_gpu: float
    """Model TFLOPS (recompute not counted) at the predicted compute time."""
    tflops_source: str
    compute_s: float
    comm_gb_per_gpu: float
    comm_s: float
    step_s_overlapped: float
    step_s_serial: float
    tokens_per_s: float
    comm_assumed: str = ""
    """The bandwidths the FSDP traffic was priced at that the cluster preset does not give (assumed), or ""."""


def compile_speedup(job: TrainConfig, records: list[dict[str, Any]]) -> tuple[float, str]:
    """Median ratio of compiled to uncompiled TFLOPS over pairs on record that differ only in compile."""
    key = ("model", "precision", "ac", "batch", "device")
    plain = {
        tuple(r.get(k) for k in key): float(r["tflops"]) for r in records if not r.get("compile") and r.get("tflops")
    }
    ratios = sorted(
        float(r["tflops"]) / plain[tuple(r.get(k) for k in key)]
        for r in records
        if r.get("compile") and r.get("tflops") and tuple(r.get(k) for k in key) in plain
    )
    if not ratios:
        return 1.0, "compile speed-up: none on record, assumed 1x"
    return ratios[
        len(ratios) // 2
    ], f"compile speed-up {ratios[len(ratios) // 2]:.2f}x (median of {len(ratios)} measured pairs)"


class _Holder(nn.Module):
    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


_OPTIMIZER_TRAFFIC: dict[tuple, tuple[float, int]] = {}


def optimizer_traffic(job: TrainConfig) -> tuple[float, int]:
    """(bytes per parameter element, kernels per multi-tensor call) of the configured optimizer's step on GPU."""
    dtype = param_dtype(job.precision)
    key = (repr(job.optim), dtype)
    if key not in _OPTIMIZER_TRAFFIC:
        optim = job.optim
        if optim.name == "anyprecision":
            traffic = optimizer_bytes_per_element(lambda params: build_optimizer(_Holder(params), optim), dtype)
        elif optim.fused:  # one kernel: reads parameter, gradient and both moments, writes all but the gradient
            traffic = (7.0 * dtype_bytes(dtype), 1)
        else:  # torch's multi-tensor AdamW, its default on GPU
            traffic = optimizer_bytes_per_element(
                lambda params: torch.optim.AdamW(
                    params,
                    lr=optim.lr,
                    betas=(optim.betas[0], optim.betas[1]),
                    eps=optim.eps,
                    weight_decay=optim.weight_decay,
                    foreach=True,
                ),
                dtype,
            )
        _OPTIMIZER_TRAFFIC[key] = traffic
    return _OPTIMIZER_TRAFFIC[key]


def _optimizer_work(job: TrainConfig, shard_elements: float) -> Work:
    if job.sharding.cpu_offload:
        return Work()  # the step runs on the host
    per_element, kernels = optimizer_traffic(job)
    chunk = job.optim.chunk_elements if job.optim.name == "anyprecision" else shard_elements
    return Work(memory_bytes=per_element * shard_elements, kernels=kernels * max(1, math.ceil(shard_elements / chunk)))


def _regathered(job: TrainConfig, shape: ModelShape) -> int:
    """Parameters all-gathered a second time, for backward (0 without resharding after forward)."""
    if not reshard_after_forward(job.sharding):
        return 0
    return shape.params if shape.regathered is None else shape.regathered


def _fsdp_copies(job: TrainConfig, shape: ModelShape, factor: int) -> Work:
    """FSDP2's local traffic around its collectives: the copy into the all-gather buffer (with the cast to the
    compute dtype) and out of it into the unsharded parameters, and the same for the gradients' reduce-scatter."""
    pbytes, cbytes, rbytes = precision_bytes(job.precision)
    gathered = shape.params + _regathered(job, shape)
    all_gather = gathered * ((pbytes + cbytes) / factor + 3 * cbytes)
    reduce_scatter = shape.params * (cbytes + 2 * rbytes + (rbytes + pbytes) / factor)
    return Work(memory_bytes=all_gather + reduce_scatter, kernels=4 * shape.units)


def step_work(job: TrainConfig, shape: ModelShape, work: StepWork, batch: int, factor: int) -> Work:
    """All the GPU work of one training step on one GPU."""
    selective = job.ac.mode == CheckpointMode.selective
    checkpointed = set(checkpointed_indices(job.ac, len(work.layer_forward)))
    total = work.at(batch, checkpointed, selective) + _fsdp_copies(job, shape, factor)
    total = total + _optimizer_work(job, shape.params / factor)
    if job.trainer.clip_grad_norm is not None:  # one norm over the gradients, one in-place scale
        total = total + Work(
            memory_bytes=3 * dtype_bytes(param_dtype(job.precision)) * shape.params / factor, kernels=2
        )
    return total


def _memory_bandwidth(job: TrainConfig) -> tuple[float, str]:
    cluster = job.cluster
    if cluster.memory_bandwidth_gb_s:
        return cluster.memory_bandwidth_gb_s * 1e9, ""
    assumed = (cluster.peak_tflops or 0.0) * 1e12 * BYTES_PER_S_PER_FLOPS
    return assumed, f"; HBM bandwidth assumed {assumed / 1e9:.0f} GB/s (set cluster.memory_bandwidth_gb_s)"


def observation(
    job: TrainConfig,
    shape: ModelShape,
    work: StepWork,
    batch: int,
    world: int,
    measured_s: float = 0.0,
    label: str = "",
) -> Observation:
    """The step's work as the terms of plan/calibration.py's time model."""
    cluster = job.cluster
    total = step_work(job, shape, work, batch, shard_factor(job.sharding, world, cluster.gpus_per_node))
    flops = total.matmul_flops + total.attention_flops
    bandwidth, _ = _memory_bandwidth(job)
    if job.precision.name == Precision.fp32:
        peak32 = cluster.peak_tflops_fp32 or (cluster.peak_tflops or 0.0) / 16
        matmul = (0.0, flops / (peak32 * 1e12))
    else:
        matmul = (flops / ((cluster.peak_tflops or 0.0) * 1e12), 0.0)
    return Observation(*matmul, total.memory_bytes / bandwidth, total.kernels, measured_s, label)


ASSUMED_INTRA_NODE_GB_S = 100.0
"""GPU-to-GPU bandwidth inside a node where the cluster preset gives none (cluster.intra_node_gbps), GB/s."""
ASSUMED_INTER_NODE_GBPS = 100.0
"""Network bandwidth between nodes where the cluster preset gives none (cluster.inter_node_gbps), Gb/s."""


def _bandwidth_gb_s(job: TrainConfig, group_spans_nodes: bool) -> tuple[float, list[str]]:
    """The bus bandwidth of a collective, and what of it is assumed rather than given by the cluster preset."""
    cluster = job.cluster
    nvlink = cluster.intra_node_gbps or ASSUMED_INTRA_NODE_GB_S
    assumed = (
        []
        if cluster.intra_node_gbps
        else [f"GPU-to-GPU bandwidth in a node assumed {ASSUMED_INTRA_NODE_GB_S:g} GB/s (set cluster.intra_node_gbps)"]
    )
    if not group_spans_nodes:
        return nvlink, assumed
    # A ring crossing nodes pushes the whole buffer through each node's network once (NCCL spreads its channels
    # over all of the node's NICs), so the bus bandwidth is the node's aggregate network bandwidth.
    network = (cluster.inter_node_gbps or ASSUMED_INTER_NODE_GBPS) / 8.0
    if not cluster.inter_node_gbps:
        assumed.append(f"network between nodes assumed {ASSUMED_INTER_NODE_GBPS:g} Gb/s (set cluster.inter_node_gbps)")
    return min(nvlink, network), assumed


def estimate_speed(
    job: TrainConfig,
    shape: ModelShape,
    flops_per_sample: int,
    batch: int,
    world: int,
    work: StepWork,
    records: list[dict[str, Any]] | None = None,
    calibration: Calibration | None = None,
) -> SpeedEstimate:
    cluster = job.cluster
    records = load_records() if records is None else records
    calibration = calibration or calibration_file.shipped()
    speedup, speedup_text = compile_speedup(job, records) if job.trainer.compile else (1.0, "")
    compute_s = predict(calibration, observation(job, shape, work, batch, world)) / speedup
    _, bandwidth_text = _memory_bandwidth(job)
    source = f"calibrated: {calibration.describe()}" + (f", {speedup_text}" if speedup_text else "") + bandwidth_text
    tflops = flops_per_sample * batch / compute_s / 1e12

    factor = shard_factor(job.sharding, world, cluster.gpus_per_node)
    replicas = world // factor
    _, cbytes, rbytes = precision_bytes(job.precision)
    shard_traffic = ((shape.params + _regathered(job, shape)) * cbytes + shape.params * rbytes) * (factor - 1) / factor
    replica_traffic = 2 * shape.params / factor * rbytes * (replicas - 1) / replicas if replicas > 1 else 0.0
    shard_spans_nodes = factor > cluster.gpus_per_node
    replicas_span_nodes = replicas > 1 and world > cluster.gpus_per_node
    shard_bw, shard_assumed = _bandwidth_gb_s(job, shard_spans_nodes)
    replica_bw, replica_assumed = _bandwidth_gb_s(job, replicas_span_nodes)
    comm_s = shard_traffic / (shard_bw * 1e9) + replica_traffic / (replica_bw * 1e9)
    # only what priced some traffic (one GPU moves nothing)
    assumed = dict.fromkeys((shard_assumed if shard_traffic else []) + (replica_assumed if replica_traffic else []))
    offload_s = 0.0
    if job.sharding.cpu_offload:  # parameter shards up, gradient shards down, every step
        shard = shape.params / factor
        offload_s = 2 * shard * dtype_bytes(param_dtype(job.precision)) / (PCIE_GB_S * 1e9)
        offload_s += optimizer_traffic(job)[0] * shard / (HOST_MEMORY_GB_S * 1e9)  # the optimizer step on the host
    overlapped = max(compute_s, comm_s) + offload_s
    tokens = batch * world * (job.data.max_source_len + job.data.max_target_len)
    return SpeedEstimate(
        tflops,
        source,
        compute_s,
        (shard_traffic + replica_traffic) / 1e9,
        comm_s,
        overlapped,
        compute_s + comm_s + offload_s,
        tokens / overlapped,
        "; ".join(assumed),
    )
