"""Throughput, FLOPs, loss and memory over a logging window, reduced across ranks at log time only."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

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


class Tracker:
    """Accumulates per-step numbers without host syncs; ``record()`` syncs once and reduces across ranks."""

    def __init__(self, device: torch.device, world_size: int, peak_override: float | None = None) -> None:
        self.device, self.world_size = device, world_size
        self.device_name = device_name(device)
        self.peak_tflops = peak_tflops(self.device_name, peak_override)
        self._window = _Window()
        self._closed: list[tuple[float, int, float, float]] = []  # (seconds, steps, tokens, flops) per window

    def start_window(self) -> None:
        synchronize(self.device)
        self._window = _Window(started=time.perf_counter())

    def add_step(self, loss_sum: torch.Tensor, target_tokens: torch.Tensor, tokens: int,
                 real_tokens: torch.Tensor, flops: int) -> None:
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
        local = torch.stack([torch.stack(w.loss_sum).sum(), torch.stack(w.target_tokens).sum(),
                             torch.stack(w.real_tokens).sum().to(w.loss_sum[0].device)]).double()
        counts = torch.tensor([w.tokens, w.flops], dtype=torch.float64, device=local.device)
        totals = torch.cat([local, counts])
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, target_tokens, real_tokens, tokens, flops = totals.tolist()
        step_time = elapsed / w.steps
        tflops = flops / elapsed / self.world_size / 1e12
        allocated, reserved = peak_memory_gb(self.device)
        self._closed.append((elapsed, w.steps, tokens, flops))
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
        }

    def summary(self) -> dict[str, float | int | str | None]:
        """Run-level throughput over the logged windows, leaving out the first (warm-up, compilation)
        whenever there is more than one."""
        windows = self._closed[1:] if len(self._closed) > 1 else self._closed
        seconds = sum(w[0] for w in windows)
        steps = sum(w[1] for w in windows)
        allocated, reserved = peak_memory_gb(self.device)
        if not steps or seconds <= 0:  # nothing trained in this process (e.g. resumed at max_steps): no rates
            rates: dict[str, float | None] = dict.fromkeys(("tokens_per_s", "tflops_per_gpu", "mfu", "step_time_s"))
        else:
            tflops = sum(w[3] for w in windows) / seconds / self.world_size / 1e12
            rates = {"tokens_per_s": sum(w[2] for w in windows) / seconds, "tflops_per_gpu": tflops,
                     "mfu": tflops / self.peak_tflops if self.peak_tflops else None, "step_time_s": seconds / steps}
        return {
            "steps_measured": steps,
            "tokens_per_s": rates["tokens_per_s"],
            "tflops_per_gpu": rates["tflops_per_gpu"],
            "mfu": rates["mfu"],
            "peak_mem_gb": allocated,
            "peak_reserved_gb": reserved,
            "step_time_s": rates["step_time_s"],
            "device": self.device_name,
            "world_size": self.world_size,
        }
