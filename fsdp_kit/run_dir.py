"""One run directory per job, the same on every rank, stable across Slurm requeues.

Every rank composes the Hydra config on its own, so a plain time stamp could differ between ranks that
start a second apart. ``${fsdp_kit_run_id:}`` resolves to the Slurm job id when there is one (a requeued
job finds its checkpoints again), else the torchrun rendezvous id, else the start time of the launching
torchrun agent (shared by its workers), else the current time. Rank 0's choice is broadcast anyway.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from omegaconf import OmegaConf

_STAMP = "%Y-%m-%d/%H-%M-%S"


def run_id() -> str:
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        array_task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f"_{array_task}" if array_task else "")
    if env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if "LOCAL_RANK" in env:
        started = _process_start_time(os.getppid())
        if started is not None:
            return started.strftime(_STAMP)
    return datetime.datetime.now().strftime(_STAMP)


def _process_start_time(pid: int) -> datetime.datetime | None:
    """Wall-clock start of ``pid`` from /proc (Linux); None where /proc is not available."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return datetime.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fsdp_kit_run_id"):
        OmegaConf.register_new_resolver("fsdp_kit_run_id", run_id, use_cache=True)
