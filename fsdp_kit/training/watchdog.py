"""Hang watchdog: a training step that runs far longer than the recent ones means a hung rank or collective.

Every rank runs its own watchdog thread. The loop marks each step's start and end (a monotonic time stamp
written, no device sync, no collective); the thread wakes a few times a second and, once the running step has
taken longer than ``max(trainer.hang_timeout_s, trainer.hang_factor x median of the recent steps)`` (the
process's first step: ``hang_factor x hang_timeout_s``), dumps every
Python thread's stack (faulthandler: to stderr and to ``<run_dir>/hang/rank{R}.txt``) and ends the process with
EXIT_REQUEUE, so Slurm restarts the job from its last checkpoint instead of idling the allocation until its
time limit. A hung rank also blocks the others in their next collective, so their own watchdogs fire too:
no rank waits on another to decide, and ``os._exit`` does not wait on the blocked main thread.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE
from fsdp_kit.training.config import TrainerConfig

HANG_DIR = "hang"
# Recent steps the median is taken over; the first step (compilation, allocator warm-up) is never among them.
_HISTORY = 20


class HangWatchdog:
    """Context manager around the loop; ``step_started()``/``step_finished()`` bracket each training step."""

    def __init__(self, cfg: TrainerConfig, run_dir: str | Path, rank: int, on_fire: Any = None) -> None:
        self.enabled = cfg.hang_timeout_s > 0
        self.timeout_s, self.factor, self.rank = cfg.hang_timeout_s, cfg.hang_factor, rank
        self.path = Path(run_dir) / HANG_DIR / f"rank{rank}.txt"
        self._on_fire = on_fire  # called after the stacks are written, before the exit (rank 0: requeue)
        self._recent: collections.deque[float] = collections.deque(maxlen=_HISTORY)
        self._seen_first = False
        self._started: float | None = None
        self._step = 0
        # The first step of a process (compilation, allocator and communicator warm-up) has no median to go by:
        # it gets hang_factor x hang_timeout_s.
        self._limit = self.factor * self.timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HangWatchdog:
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="fsdp_kit-hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def step_started(self, step: int) -> None:
        """Training step ``step`` (1-based, the one about to run) begins."""
        self._step = step
        self._started = time.monotonic()

    def step_finished(self) -> None:
        started, self._started = self._started, None
        if started is None or not self.enabled:
            return
        if self._seen_first:
            self._recent.append(time.monotonic() - started)
            self._limit = max(self.timeout_s, self.factor * statistics.median(self._recent))
        self._seen_first = True

    @property
    def limit_s(self) -> float:
        """How long the next step may run before the watchdog fires."""
        return self._limit

    def _watch(self) -> None:
        interval = min(1.0, max(0.05, self.timeout_s / 20))
        while not self._stop.wait(interval):
            started, limit = self._started, self._limit
            if started is not None and time.monotonic() - started > limit:
                self._fire(time.monotonic() - started, limit)

    def _fire(self, elapsed: float, limit: float) -> None:
        rule = (
            f"max(trainer.hang_timeout_s={self.timeout_s:g}, trainer.hang_factor={self.factor:g} x median step "
            f"{statistics.median(self._recent):.3g}s)"
            if self._recent
            else f"trainer.hang_factor={self.factor:g} x trainer.hang_timeout_s={self.timeout_s:g} for a first step"
        )
        header = (
            f"fsdp_kit hang watchdog: rank {self.rank} has been in step {self._step} for {elapsed:.1f}s, over "
            f"its limit {limit:.1f}s ({rule}). The Python stacks of every thread follow; exiting with "
            f"{EXIT_REQUEUE} so the job is requeued and resumes from its last checkpoint.\n"
        )
        _dump(header, sys.stderr)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", encoding="utf-8") as handle:
                _dump(header, handle)
        except OSError as err:  # a full or vanished disk must not keep a hung job alive
            print(f"fsdp_kit hang watchdog: could not write {self.path}: {err}", file=sys.stderr, flush=True)
        if self._on_fire is not None:
            try:
                self._on_fire()
            except Exception as err:  # the exit below is what matters
                print(f"fsdp_kit hang watchdog: {err}", file=sys.stderr, flush=True)
        os._exit(EXIT_REQUEUE)  # the main thread is stuck (maybe in a collective): do not wait on it


def _dump(header: str, stream: TextIO) -> None:
    stream.write(header)
    stream.flush()
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (e.g. under a test runner)
        fd = 2
    faulthandler.dump_traceback(file=fd, all_threads=True)
