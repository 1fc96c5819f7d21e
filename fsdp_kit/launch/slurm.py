"""What a Slurm job looks like for a config, and the checks that run before anything is submitted."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from fsdp_kit.config import TrainConfig, compose_job
from fsdp_kit.errors import ConfigError
from fsdp_kit.preflight import preflight

__all__ = [
    "RUN_DIR_NAME",
    "TORCHRUN_LOGS",
    "available_partitions",
    "check",
    "compose_job",
    "job_name",
    "procs_per_node",
    "run_dir",
    "timeout_minutes",
    "world_size",
]


# A Slurm job's run dir under slurm.output_root; the sbatch template is rendered from this pattern.
RUN_DIR_NAME = "{job_name}-{job_id}"
# torchrun's --log-dir under the run dir: each attempt's worker output, per local rank (fsdp_kit.launch.torchrun
# names the file in its line for each failure).
TORCHRUN_LOGS = "torchrun"


def job_name(job: TrainConfig) -> str:
    return job.slurm.job_name or f"fsdp-{job.model.name}"


def run_dir(job: TrainConfig, job_id: str) -> Path:
    """Where a Slurm job trains: the same after a requeue (same job id), so it finds its checkpoints."""
    return Path(job.slurm.output_root) / RUN_DIR_NAME.format(job_name=job_name(job), job_id=job_id)


def procs_per_node(job: TrainConfig) -> int:
    return job.slurm.procs_per_node or job.cluster.gpus_per_node or 1


def world_size(job: TrainConfig) -> int:
    return job.cluster.nodes * procs_per_node(job)


def available_partitions() -> list[str] | None:
    """Partition names of the Slurm this machine talks to; None where there is no Slurm client."""
    if shutil.which("sinfo") is None:
        return None
    result = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()  # sinfo's last line is its fatal reason; one line for the user
        raise ConfigError(
            f"sinfo failed ({lines[-1] if lines else f'exit {result.returncode}'})",
            "check that the Slurm controller is reachable (SLURM_CONF, munge)",
        )
    return sorted(set(result.stdout.split()))


def check(job: TrainConfig, local_checks: bool = True) -> None:
    """Reject a job Slurm or the trainer would refuse, before anything is submitted.

    ``local_checks`` also checks what only this machine can see (data files, the Slurm partitions); turn it
    off when rendering a file for another cluster.
    """
    cluster, slurm = job.cluster, job.slurm
    if cluster.nodes < 1:
        raise ConfigError(f"cluster.nodes={cluster.nodes} must be at least 1", "pass cluster.nodes=<n>")
    wanted = procs_per_node(job)
    if cluster.gpus_per_node and wanted > cluster.gpus_per_node:
        raise ConfigError(
            f"slurm.procs_per_node={wanted} asks for more GPUs per node than {cluster.instance_type or cluster.name} "
            f"has ({cluster.gpus_per_node})",
            f"use slurm.procs_per_node<={cluster.gpus_per_node} or add nodes",
        )
    timeout_minutes(slurm.time)  # raises for what Slurm would refuse
    device_type = "cuda" if cluster.gpus_per_node else "cpu"
    preflight(job, world_size=world_size(job), device_type=device_type, probe_device=False, check_files=local_checks)
    if local_checks and slurm.partition:
        partitions = available_partitions()
        if partitions is not None and slurm.partition not in partitions:
            raise ConfigError(
                f"slurm.partition={slurm.partition!r} does not exist on this cluster",
                f"use one of {', '.join(partitions) or '(none found)'}",
            )


def timeout_minutes(time_limit: str) -> int | None:
    """Minutes in a Slurm time limit (submitit wants minutes); None for no limit (UNLIMITED, INFINITE, 0).

    Slurm's forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
    days-hours:minutes:seconds. Anything else raises ConfigError."""
    value = str(time_limit).strip()
    match = _TIME.fullmatch(value)
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    if match is None:
        raise ConfigError(
            f"slurm.time={time_limit!r} is not a Slurm time limit",
            "use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED, e.g. slurm.time=04:00:00",
        )
    clock = [int(part) for part in match.group("clock").split(":")]
    if match.group("days") is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = [*clock, 0, 0][:3]
        hours += int(match.group("days")) * 24
    elif len(clock) == 3:  # HH:MM:SS
        hours, minutes, seconds = clock
    else:  # MM, MM:SS
        hours, minutes, seconds = 0, clock[0], [*clock, 0][1]
    total = hours * 60 + minutes + (1 if seconds else 0)
    return total or None  # Slurm: a limit of 0 is no limit


_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<clock>\d+(?::\d{1,2}){0,2})")
