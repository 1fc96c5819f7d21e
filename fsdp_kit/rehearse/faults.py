"""Fault injection for the multi-node tests and ``fsdp-kit rehearse``; never part of a real job.

It runs only where a job puts ``fsdp_kit/rehearse/inject`` on PYTHONPATH (its sitecustomize loads this in every
Python process) AND the environment says what to break: ``FSDP_KIT_TEST_FAULT=<kill|hang>:<rank>:<step>:<once file>``
(sbatch passes the submitter's environment on). Without both, nothing is changed.

At the start of training step <step>, the trainer of global rank <rank> SIGKILLs itself (what the OOM killer or a
GPU fault does) or sleeps (a hung kernel, for the hang watchdog to find), once: it creates <once file> first, so the
restarted workers train on.
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "FSDP_KIT_TEST_FAULT"


def fault_spec(kind: str, rank: int, step: int, once_file: str) -> str:
    """The value of FAULT_ENV that breaks global ``rank`` at ``step`` (``kind``: kill or hang), once."""
    if kind not in ("kill", "hang"):
        raise ValueError(f"fault kind {kind!r}: use kill or hang")
    return f"{kind}:{rank}:{step}:{once_file}"


def install() -> None:
    """Patch the trainer of the rank FAULT_ENV names; a no-op anywhere else."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or not os.environ.get("TORCHELASTIC_RUN_ID") or "RANK" not in os.environ:  # a trainer under torchrun
        return
    kind, rank, step, once = spec.split(":", 3)
    if int(os.environ["RANK"]) != int(rank) or os.path.exists(once):
        return
    from fsdp_kit.training.trainer import Trainer

    original = Trainer._train_step

    def faulty_train_step(self, micro_batches):
        if self.state.step + 1 == int(step) and not os.path.exists(once):
            open(once, "w").close()
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        return original(self, micro_batches)

    Trainer._train_step = faulty_train_step  # type: ignore[method-assign]  # the fault wraps the step, by design
