"""The machines a job runs on, and the Slurm settings of ``fsdp-kit slurm`` / ``fsdp-kit submit``."""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_kit.checks import check_fields


@dataclass
class ClusterConfig:
    name: str = "local"
    """Preset name: local (this machine, CPU), p4d, p4de, p5, h100, h200, or your own YAML in a config dir's
    cluster/ folder (``--config-dir``)."""
    instance_type: str | None = None
    """Cloud instance type, for the record (p4d.24xlarge, p5.48xlarge)."""
    nodes: int = 1
    """Nodes the job uses."""
    gpus_per_node: int = 0
    """GPUs one node has; 0 for a CPU-only machine."""
    gpu: str | None = None
    """GPU model, e.g. A100-SXM4-40GB."""
    gpu_memory_gb: float | None = None
    """Memory of one GPU in GB."""
    peak_tflops: float | None = None
    """Dense bf16 peak of one GPU, TFLOPS."""
    peak_tflops_fp32: float | None = None
    """Dense fp32 peak of one GPU (CUDA cores; torch leaves TF32 matmuls off by default), TFLOPS; the planner
    prices precision=fp32 with it (null: peak_tflops / 16, the A100/H100 ratio)."""
    memory_bandwidth_gb_s: float | None = None
    """HBM bandwidth of one GPU, GB/s (the planner prices memory-bound ops with it; null: assumed from peak_tflops
    at an H100's ratio)."""
    intra_node_gbps: float | None = None
    """GPU-to-GPU bandwidth inside a node (NVLink), GB/s per GPU."""
    inter_node_gbps: float | None = None
    """Network bandwidth between nodes (EFA), Gb/s per node."""
    efa: bool = False
    """The nodes talk over AWS EFA (sets the libfabric/NCCL environment in sbatch files)."""
    cpus_per_node: int | None = None
    """CPU cores (vCPUs) per node."""

    def check(self, prefix: str = "cluster.") -> None:
        """Each setting finite and in its range (``prefix``: where this config sits in the job)."""
        check_fields(
            self,
            prefix,
            {
                "nodes": ">0",
                "gpus_per_node": ">=0",
                "gpu_memory_gb": ">0",
                "peak_tflops": ">0",
                "intra_node_gbps": ">0",
                "inter_node_gbps": ">0",
                "cpus_per_node": ">0",
                "peak_tflops_fp32": ">0",
                "memory_bandwidth_gb_s": ">0",
            },
        )


@dataclass
class SlurmConfig:
    partition: str | None = None
    """Partition (queue) to submit to; null uses the cluster's default."""
    account: str | None = None
    """Slurm account to charge; null for none."""
    time: str = "04:00:00"
    """Time limit, any form Slurm takes: minutes (90), MM:SS, HH:MM:SS, D-HH (2-12), D-HH:MM, D-HH:MM:SS, or
    UNLIMITED."""
    job_name: str | None = None
    """Job name; null gives fsdp-<model name>."""
    procs_per_node: int | None = None
    """Training processes per node; null gives one per GPU (cluster.gpus_per_node), or 1 on CPU."""
    cpus_per_task: int | None = None
    """CPU cores for each node's task (sbatch) or each process (submit); null leaves Slurm's default."""
    exclusive: bool = True
    """Whole nodes only (no other jobs on them)."""
    setup: str = "source .venv/bin/activate"
    """Shell line that makes fsdp_kit importable on the nodes (venv, conda, module load, container)."""
    output_root: str = "outputs/slurm"
    """Run dirs go to <output_root>/<job name>-<job id> (the same after a requeue, so training resumes)."""
    log_dir: str = "logs/slurm"
    """Where Slurm/submitit write job logs."""
    signal_before_s: int = 90
    """Send SIGUSR2 this many seconds before the time limit: the trainer saves and the job requeues."""
    requeue: bool = True
    """Requeue the job after a preemption or time-limit save, or a hang its restarts did not cure; false: the job
    ends after the save (submit again to continue from it)."""
    max_requeues: int = 10
    """Stop instead of requeueing once the job was requeued this often (Slurm's SLURM_RESTART_COUNT): a hang that
    recurs at the same step does not requeue forever."""
    max_restarts: int = 3
    """A rank that dies (signal, exception, a collective whose peer went away) or hangs (trainer.hang_timeout_s)
    restarts the workers of every node in place (torchrun --max-restarts, c10d rendezvous), resuming from the
    newest checkpoint, at most this often per job run; then the job stops (or, after a hang, is requeued)."""
    rdzv_port: int = 29500
    """Port of torchrun's c10d rendezvous on the first compute node."""
    nccl_debug: bool = False
    """Export NCCL_DEBUG=INFO (for debugging hangs)."""

    def check(self, prefix: str = "slurm.") -> None:
        """Each setting finite and in its range (``prefix``: where this config sits in the job)."""
        check_fields(
            self,
            prefix,
            {
                "signal_before_s": ">=0",
                "max_requeues": ">=0",
                "max_restarts": ">=0",
                "procs_per_node": ">0",
                "cpus_per_task": ">0",
                "rdzv_port": "port",
            },
        )
