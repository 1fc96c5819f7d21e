"""Step time from compute and FSDP communication volume.

Compute: counted model FLOPs per GPU divided by a per-GPU TFLOPS: measured, where benchmarks/results/ holds a run
of the same model and recipe on the same GPU, else an assumed fraction of the GPU's dense peak (stated). Traffic per
GPU and step: all-gather of the parameters in forward, again in backward when resharding, reduce-scatter of the
gradients; hybrid sharding adds an all-reduce of the sharded gradients across replicas. Collectives inside a node
run at NVLink speed; a group that spans nodes runs at the node's aggregate network bandwidth (ring bus bandwidth). FSDP
prefetches, so collectives overlap compute: the estimate gives full overlap (max) and none (sum).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fsdp_kit.config import TrainConfig
from fsdp_kit.plan.memory import ModelShape, precision_bytes, shard_factor
from fsdp_kit.policies.sharding import reshard_after_forward

RESULTS = Path(__file__).resolve().parent.parent.parent / "benchmarks" / "results"
ASSUMED_MFU = 0.35


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


def measured_tflops(job: TrainConfig, results: Path = RESULTS) -> tuple[float, str] | None:
    """Median TFLOPS of matching runs recorded by benchmarks/throughput.py (model, recipe and GPU)."""
    gpu = (job.cluster.gpu or "").split("-")[0].lower()
    found: list[tuple[float, str]] = []
    for path in sorted(results.rglob("throughput*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        same = (record.get("model") == job.model.name and record.get("precision") == job.precision.name
                and record.get("ac") == job.ac.mode and gpu and gpu in str(record.get("device", "")).lower())
        if same and record.get("tflops_per_gpu"):
            found.append((float(record["tflops_per_gpu"]), str(path.relative_to(results.parent.parent))))
    if not found:
        return None
    found.sort()
    return found[len(found) // 2]


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
                   world: int) -> SpeedEstimate:
    cluster = job.cluster
    measured = measured_tflops(job)
    if measured:
        tflops, source = measured[0], f"measured ({measured[1]})"
    else:
        tflops = ASSUMED_MFU * (cluster.peak_tflops or 0.0)
        source = f"assumed {ASSUMED_MFU:.0%} of the {cluster.peak_tflops:g} TFLOPS peak (no measurement on record)"
    compute_s = flops_per_sample * batch / (tflops * 1e12)

    factor = shard_factor(job, world, cluster.gpus_per_node)
    replicas = world // factor
    _, cbytes, rbytes = precision_bytes(job)
    gathers = 2 if reshard_after_forward(job.sharding) else 1
    shard_traffic = shape.params * (gathers * cbytes + rbytes) * (factor - 1) / factor
    replica_traffic = 2 * shape.params / factor * rbytes * (replicas - 1) / replicas if replicas > 1 else 0.0
    shard_spans_nodes = factor > cluster.gpus_per_node
    replicas_span_nodes = replicas > 1 and world > cluster.gpus_per_node
    comm_s = (shard_traffic / (_bandwidth_gb_s(job, shard_spans_nodes) * 1e9)
              + replica_traffic / (_bandwidth_gb_s(job, replicas_span_nodes) * 1e9))
    overlapped = max(compute_s, comm_s)
    tokens = batch * world * (job.data.max_source_len + job.data.max_target_len)
    return SpeedEstimate(tflops, source, compute_s, (shard_traffic + replica_traffic) / 1e9, comm_s, overlapped,
                         compute_s + comm_s, tokens / overlapped)
