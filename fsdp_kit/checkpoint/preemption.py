"""Preemption: a signal on any rank becomes a save-and-exit that every rank agrees on at a step boundary.

Slurm sends SIGTERM on preemption/scancel and, with ``--signal=USR2@90``, SIGUSR2 before the time limit.
The handler only sets a flag. Each step every rank starts an asynchronous OR of the flags over a CPU (gloo)
group of its own and reads the one it started a step earlier, long finished: agreeing costs no GPU
synchronization and no waiting, and since every rank reads reduction k at the same step, all stop at the
same step (one step after the signal's reduction began), so the checkpoint they save is consistent.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the launchers read the constants below without torch
    import torch  # late: launch/ imports this module's exit codes without torch
    import torch.distributed as dist  # late: launch/ imports this module's exit codes without torch

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
# The contract with launchers (the sbatch template is rendered from these, never spells them itself):
# EX_TEMPFAIL, "try again later": every trainer exits with it after a preemption save.
EXIT_REQUEUE = 75
# Rank 0 writes this file into the run dir after a preemption save (holding the step), and deletes it at start.
PREEMPTED_MARKER = "preempted"


class PreemptionFlag:
    def __init__(self, world_size: int, timeout_s: float | None = None) -> None:
        """``timeout_s``: the job's collective timeout (dist.timeout_s); None: torch's default for new groups."""
        self.world_size = world_size
        self.received: int | None = None
        self._group = None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        if world_size > 1:
            import torch.distributed as dist  # late: launch/ imports this module's exit codes without torch

            from fsdp_kit.distributed import group_timeout

            # Its own gloo group: agreeing on the flag must not wait on (or sync) the GPU stream, nor queue
            # behind (or ahead of) training's collectives.
            self._group = dist.new_group(backend="gloo", timeout=group_timeout(timeout_s))

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    @contextmanager
    def installed(self) -> Iterator[PreemptionFlag]:
        previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}
        try:
            yield self
        finally:
            self._drain()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def poll(self) -> bool:
        """True on every rank, at the same step, once any rank received a preemption signal (collective call,
        once per step on every rank). Returns the agreement started at the previous call and starts the next
        one; the host never waits for a reduction in flight."""
        if self._group is None:
            return self.received is not None
        import torch  # late: launch/ imports this module's exit codes without torch
        import torch.distributed as dist  # late: launch/ imports this module's exit codes without torch

        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()  # started a whole step ago on a CPU group: finished, so this returns at once
            # tolist reads the finished host tensor; it is not a device sync (the flag never leaves the CPU).
            agreed = bool(flag.tolist()[0])
        if agreed:
            self._pending = None
            return True
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return False

    def _drain(self) -> None:
        """Finish the reduction in flight, so no rank leaves a collective behind when training ends."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
