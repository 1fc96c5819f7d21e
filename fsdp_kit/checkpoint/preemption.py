"""Preemption: a signal on any rank becomes a save-and-exit that every rank agrees on at a step boundary.

Slurm sends SIGTERM on preemption/scancel and, with ``--signal=USR2@90``, SIGUSR2 before the time limit.
The handler only sets a flag; ranks OR their flags each step over a CPU (gloo) group, which costs no GPU
synchronization.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
# The contract with launchers (the sbatch template is rendered from these, never spells them itself):
# EX_TEMPFAIL, "try again later": every trainer exits with it after a preemption save.
EXIT_REQUEUE = 75
# Rank 0 writes this file into the run dir after a preemption save (holding the step), and deletes it at start.
PREEMPTED_MARKER = "preempted"


class PreemptionFlag:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.received: int | None = None
        self._group = None
        if world_size > 1:
            # A separate gloo group: agreeing on the flag must not wait on (or sync) the GPU stream.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    @contextmanager
    def installed(self) -> Iterator[PreemptionFlag]:
        previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def agreed(self) -> bool:
        """True on every rank as soon as any rank received a preemption signal (collective call)."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
