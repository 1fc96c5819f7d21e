"""``fsdp-kit submit``: a multi-node job through submitit, one task per GPU, requeued after preemption/timeout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from fsdp_kit.config import TrainConfig, compose_with_origins
from fsdp_kit.launch.sbatch import directives
from fsdp_kit.launch.slurm import check, compose_job, job_name, procs_per_node, run_dir, timeout_minutes


@dataclass
class TrainJob:
    """The callable submitit pickles and runs on every task. It composes the config on the node, so the job
    trains exactly what the overrides say there; the run dir follows the Slurm job id, so a requeued job
    finds its checkpoints."""

    overrides: list[str]

    def __call__(self) -> dict[str, Any] | None:
        from fsdp_kit.train import run  # late: runs on the node, not where the job is submitted

        job, origins = compose_with_origins(self.overrides)  # a --config-dir folder first, as on the login node
        job.run_dir = str(run_dir(job, os.environ["SLURM_JOB_ID"]))
        result = run(job, origins=origins)  # on preemption it saved and asked Slurm to requeue
        return None if result.preempted else result.summary

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """submitit's hook for a signal that arrives before training started: just run again."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.overrides))


def submit(overrides: list[str], folder: str | None = None) -> tuple[submitit.Job, TrainConfig]:
    """Check, then submit ``overrides`` as one multi-node Slurm job."""
    job = compose_job(overrides)
    check(job)
    # submitit writes these into an sbatch file as "#SBATCH --key=value" lines: the same checks as ours (a newline
    # would end the directives and run the rest of the value as shell).
    directives(job)
    slurm, cluster = job.slurm, job.cluster
    executor = submitit.SlurmExecutor(
        folder=folder or str(Path(slurm.log_dir) / "%j"), max_num_timeout=slurm.max_requeues if slurm.requeue else 0
    )
    minutes = timeout_minutes(slurm.time)
    executor.update_parameters(
        job_name=job_name(job),
        nodes=cluster.nodes,
        ntasks_per_node=procs_per_node(job),
        gpus_per_node=procs_per_node(job) if cluster.gpus_per_node else None,
        cpus_per_task=slurm.cpus_per_task,
        time=minutes if minutes is not None else "UNLIMITED",
        signal_delay_s=slurm.signal_before_s,
        partition=slurm.partition,
        account=slurm.account,
        exclusive=slurm.exclusive or None,
        additional_parameters={"requeue": True} if slurm.requeue else {},
    )
    return executor.submit(TrainJob(list(overrides))), job
