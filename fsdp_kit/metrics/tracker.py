"""Throughput, FLOPs, loss and memory over a logging window, reduced across ranks at log time only."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from fsdp_kit.metrics.peak import device_name, peak_tflops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> tuple[float, float]:
    """(peak allocated, peak reserved) on a GPU; (peak RSS, peak RSS) of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, torch.cuda.max_memory_reserved(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB
    return rss, rss


@dataclass
class _Window:
    steps: int = 0
    loss_sum: list[torch.Tensor] = field(default_factory=list)
    target_tokens: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    real_tokens: list[torch.Tensor] = field(default_factory=list)
    flops: int = 0
    started: float = 0.0
    step_times: list[float] = field(default_factory=list)  # this rank's wall time per step
    local_times: list[float] = field(default_factory=list)  # this rank's own work per step (see RankClock)


class Tracker:
    """Accumulates per-step numbers without host syncs; ``record()`` syncs once and reduces across ranks."""

    def __init__(
        self, device: torch.device, world_size: int, peak_override: float | None = None, rank: int = 0
    ) -> None:
        self.device, self.world_size, self.rank = device, world_size, rank
        self.device_name = device_name(device)
        self.peak_tflops = peak_tflops(self.device_name, peak_override)
        self._window = _Window()
        self._closed: list[tuple[float, ...]] = []  # (seconds, steps, tokens, flops, real tokens) per window
        self.clock = RankClock(device)
        self._run_steps: list[list[float]] = []  # per closed window: each step's wall time, for the summary
        self._run_local: list[list[float]] = []  # per closed window: each step's own work

    def start_window(self) -> None:
        synchronize(self.device)
        self._window = _Window(started=time.perf_counter())
        self.clock.reset()

    def step_started(self) -> None:
        """Before the step fetches its batch (host clock; a few hundred nanoseconds)."""
        self.clock.step_started()

    def batch_ready(self) -> None:
        self.clock.batch_ready()

    def collectives_done(self) -> None:
        """After the step's last collective with the other ranks (what follows is this rank's own work)."""
        self.clock.collectives_done()

    def local_work_ended(self) -> None:
        self.clock.local_work_ended()

    def add_step(
        self, loss_sum: torch.Tensor, target_tokens: torch.Tensor, tokens: int, real_tokens: torch.Tensor, flops: int
    ) -> None:
        """One optimizer step's local numbers (the tensors stay where they are, unread, until ``record``)."""
        w = self._window
        w.steps += 1
        w.loss_sum.append(loss_sum.detach().float())
        w.target_tokens.append(target_tokens.detach().float())
        w.tokens += tokens
        w.real_tokens.append(real_tokens.detach())
        w.flops += flops

    def record(self, step: int, lr: float) -> dict[str, float | int | None]:
        """Close the window: one device sync, one all-reduce; every rank gets the same numbers."""
        w = self._window
        synchronize(self.device)
        elapsed = time.perf_counter() - w.started
        local = torch.stack(
            [
                torch.stack(w.loss_sum).sum(),
                torch.stack(w.target_tokens).sum(),
                torch.stack(w.real_tokens).sum().to(w.loss_sum[0].device),
            ]
        ).double()
        counts = torch.tensor([w.tokens, w.flops], dtype=torch.float64, device=local.device)
        step_times, local_times = self.clock.read()
        # Each rank fills its own slots of the per-rank table: the sum over ranks is the whole table, so the
        # window's one all-reduce carries it (no collective of its own).
        by_rank = _rank_slots(self.rank, self.world_size, step_times, local_times, local.device)
        totals = torch.cat([local, counts, by_rank])
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, target_tokens, real_tokens, tokens, flops = totals[:5].tolist()
        ranks = rank_table(totals[5:], self.world_size)
        self._run_steps.append(step_times)
        self._run_local.append(local_times)
        step_time = elapsed / w.steps
        tflops = flops / elapsed / self.world_size / 1e12
        allocated, reserved = peak_memory_gb(self.device)
        self._closed.append((elapsed, w.steps, tokens, flops, real_tokens))
        self.start_window()
        return {
            "step": step,
            "loss": loss_sum / max(target_tokens, 1.0),
            "lr": lr,
            "tokens_per_s": tokens / elapsed,
            "real_tokens_per_s": real_tokens / elapsed,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "peak_mem_gb": allocated,
            "peak_reserved_gb": reserved,
            "step_time_s": step_time,
            **ranks,
        }

    def summary(self) -> dict[str, Any]:
        """Run-level throughput over the logged windows, leaving out the first (warm-up, compilation)
        whenever there is more than one. Every rank calls it (one all-reduce: the per-rank step times)."""
        windows = self._closed[1:] if len(self._closed) > 1 else self._closed
        skip = 1 if len(self._run_steps) > 1 else 0
        steps_run = [t for window in self._run_steps[skip:] for t in window]
        local_run = [t for window in self._run_local[skip:] for t in window]
        by_rank = _rank_slots(self.rank, self.world_size, steps_run, local_run, self.device)
        if self.world_size > 1:
            dist.all_reduce(by_rank)
        ranks = rank_table(by_rank, self.world_size)
        seconds = sum(w[0] for w in windows)
        steps = sum(w[1] for w in windows)
        allocated, reserved = peak_memory_gb(self.device)
        if not steps or seconds <= 0:  # nothing trained in this process (e.g. resumed at max_steps): no rates
            rates: dict[str, float | None] = dict.fromkeys(
                ("tokens_per_s", "real_tokens_per_s", "tflops_per_gpu", "mfu", "step_time_s")
            )
        else:
            tflops = sum(w[3] for w in windows) / seconds / self.world_size / 1e12
            rates = {
                "tokens_per_s": sum(w[2] for w in windows) / seconds,
                "tflops_per_gpu": tflops,
                "real_tokens_per_s": sum(w[4] for w in windows) / seconds,
                "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                "step_time_s": seconds / steps,
            }
        return {
            "steps_measured": steps,
            "tokens_per_s": rates["tokens_per_s"],
            "real_tokens_per_s": rates["real_tokens_per_s"],
            "tflops_per_gpu": rates["tflops_per_gpu"],
            "mfu": rates["mfu"],
            "peak_mem_gb": allocated,
            "peak_reserved_gb": reserved,
            "step_time_s": rates["step_time_s"],
            "device": self.device_name,
            "world_size": self.world_size,
            **ranks,
        }


class RankClock:
    """Per step: this rank's wall time, and its own work, i.e. the parts of the step with no collective in them.

    FSDP's collectives make every rank wait for the slowest at each all-gather and reduce-scatter, so wall step
    times are the same on every rank and cannot name a straggler. What a slow rank adds to everyone's step is its
    own work between collectives: here, fetching its batch (host clock) and its optimizer update after the step's
    last collective (on CUDA timed by two events on the stream, read at the log step, so no sync per step).
    A rank slow in its forward/backward is slow in its optimizer update too (the same device)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._started: float | None = None
        self._fetch = 0.0
        self._update_start: Any = None
        self._pending: list[tuple[float, Any, Any]] = []  # (fetch seconds, update start, update end) per step
        self._step_times: list[float] = []

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def step_started(self) -> None:
        now = time.perf_counter()
        if self._started is not None:
            self._step_times.append(now - self._started)
        self._started = now

    def batch_ready(self) -> None:
        if self._started is not None:
            self._fetch = time.perf_counter() - self._started

    def collectives_done(self) -> None:
        self._update_start = self._mark()

    def local_work_ended(self) -> None:
        if self._update_start is not None:
            self._pending.append((self._fetch, self._update_start, self._mark()))
        self._update_start = None

    def read(self) -> tuple[list[float], list[float]]:
        """(wall seconds per step, own-work seconds per step) since the last read; call after a device sync."""
        if self._started is not None:  # the last step of the window ends now
            self._step_times.append(time.perf_counter() - self._started)
            self._started = None
        local = [
            fetch + (start.elapsed_time(end) / 1e3 if self.cuda else end - start) for fetch, start, end in self._pending
        ]
        step_times = self._step_times
        self._pending, self._step_times = [], []
        return step_times, local


_RANK_STATS = ("rank_step_time_s_median", "rank_step_time_s_p90", "rank_local_s_median", "rank_local_s_p90")


def _quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q)) if values else float("nan")


def _rank_slots(
    rank: int, world_size: int, step_times: list[float], local_times: list[float], device: torch.device
) -> torch.Tensor:
    """A (stats x world) table, zero but for this rank's column."""
    table = torch.zeros(len(_RANK_STATS), world_size, dtype=torch.float64, device=device)
    table[:, rank] = torch.tensor(
        [
            _quantile(step_times, 0.5),
            _quantile(step_times, 0.9),
            _quantile(local_times, 0.5),
            _quantile(local_times, 0.9),
        ],
        dtype=torch.float64,
    )
    return table.flatten()


def rank_table(summed: torch.Tensor, world_size: int) -> dict[str, Any]:
    """Per-rank lists of each statistic, and the slowest rank: the one whose own work per step (median) is the
    longest, i.e. the rank the others wait for."""
    table = summed.reshape(len(_RANK_STATS), world_size).tolist()
    stats = {name: [round(value, 6) for value in row] for name, row in zip(_RANK_STATS, table)}
    local = stats["rank_local_s_median"]
    finite = [(value, rank) for rank, value in enumerate(local) if value == value]  # NaN: no step measured
    slowest = max(finite)[1] if finite else None
    return {**stats, "slowest_rank": slowest}
