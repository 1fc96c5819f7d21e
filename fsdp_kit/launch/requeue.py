"""After a preemption save: who brings the job back."""

from __future__ import annotations

import os
import subprocess

from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE, PREEMPTED_MARKER


def request_requeue() -> str:
    """Under submitit (fsdp-kit submit, Hydra's submitit launcher) ask Slurm to requeue the job now; elsewhere
    the launcher acts on the exit code (the sbatch template requeues on the run dir's ``preempted`` marker).
    Returns what was done, for the log."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and job_id:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
        return f"requeued Slurm job {job_id}" if done.returncode == 0 else f"scontrol requeue failed: {done.stderr}"
    if os.environ.get("TORCHELASTIC_RUN_ID") and not os.environ.get("FSDP_KIT_TORCHRUN"):
        # Plain torchrun turns the trainers' exit code into 1 (SignalException / ChildFailedError).
        return (
            f"exiting with {EXIT_REQUEUE}; plain torchrun exits 1 (the run dir's {PREEMPTED_MARKER} file marks the "
            f"preemption), python -m fsdp_kit.launch.torchrun exits {EXIT_REQUEUE}"
        )
    return f"exiting with {EXIT_REQUEUE} so the launcher requeues the job"
