"""The training loop. It owns stepping, evaluation and the cadence of logs and checkpoints, nothing else."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fsdp_kit.checkpoint.manager import CheckpointManager
from fsdp_kit.checkpoint.state import TrainState
from fsdp_kit.data.loader import DataBundle, token_counts
from fsdp_kit.data.packing import take_stream_pairs
from fsdp_kit.distributed import DistEnv
from fsdp_kit.errors import TrainingDivergedError
from fsdp_kit.launch.requeue import request_requeue
from fsdp_kit.metrics.flops import FlopCounter
from fsdp_kit.metrics.report import Reporter
from fsdp_kit.metrics.tracker import Tracker
from fsdp_kit.models.objective import IGNORE_INDEX, token_loss
from fsdp_kit.policies.config import Precision
from fsdp_kit.policies.contract import PrecisionProbe, compare, write_report
from fsdp_kit.training.config import TrainerConfig
from fsdp_kit.training.evaluator import Evaluator
from fsdp_kit.training.nonfinite import locate
from fsdp_kit.training.profiler import StepProfiler
from fsdp_kit.training.watchdog import HangWatchdog

Batch = dict[str, torch.Tensor]


@dataclass
class FitResult:
    """What a run produced. Losses and evals are global (equal on every rank); timings and memory are each
    rank's own, and rank 0's are the ones reported."""

    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    preempted: bool = False
    batch_size: int = 0
    """The per-rank batch the run trained at (the one trainer.auto_batch found, where it searched)."""
    batch_search: dict[str, Any] | None = None
    """trainer.auto_batch's search (its metrics.jsonl record), if it ran."""

    @property
    def losses(self) -> dict[int, float]:
        return {record["step"]: record["loss"] for record in self.history}


@dataclass(kw_only=True)
class TrainParts:
    """What the loop works with, built by ``fsdp_kit.train`` (or a test) and handed over as one bundle, by name."""

    model: nn.Module
    optimizer: Optimizer
    schedule: LRScheduler
    data: DataBundle
    flops: FlopCounter
    tracker: Tracker
    reporter: Reporter
    checkpoints: CheckpointManager
    grad_scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler(enabled=False))
    """Enabled for fp16 only; a disabled one passes the loss and the step through unchanged."""
    precision: PrecisionCheck | None = None


@dataclass
class PrecisionCheck:
    """The precision contract's rows for this run (fsdp_kit/policies/contract.py), checked after its first
    optimizer step; what was found goes to ``<run_dir>/precision.json``."""

    precision: Precision
    expected: dict[str, dict[str, str | None]]


class Trainer:
    def __init__(self, parts: TrainParts, cfg: TrainerConfig, env: DistEnv) -> None:
        self.model, self.optimizer, self.schedule, self.data = parts.model, parts.optimizer, parts.schedule, parts.data
        self.flops, self.tracker, self.reporter = parts.flops, parts.tracker, parts.reporter
        self.checkpoints, self.grad_scaler = parts.checkpoints, parts.grad_scaler
        self.cfg, self.env = cfg, env
        self.state = TrainState(self.model, self.optimizer, self.schedule, self.grad_scaler)
        self.evaluator = Evaluator(self.model, self.data, cfg, env, self.reporter)
        self._grad_norm: torch.Tensor | None = None
        # Step-boundary hooks, both free when off: a profiler window and the hang watchdog.
        self.profiler = StepProfiler(cfg, self.reporter.run_dir, env.rank, env.device_type, self.reporter.info)
        self.watchdog = HangWatchdog(cfg, self.reporter.run_dir, env.rank, on_fire=_requeue if env.is_main else None)
        self.nonfinite_streak = 0  # consecutive steps whose update was skipped (non-finite loss or grad norm)
        self.nonfinite_total = 0
        self.nonfinite_origin: str | None = None  # where the current non-finite streak started (the locator)
        self.precision_check = parts.precision
        self._probe: PrecisionProbe | None = None

    def fit(self) -> FitResult:
        result = FitResult(batch_size=self.cfg.batch_size)
        self.checkpoints.restore(self.state)
        if self.state.step >= self.cfg.max_steps:
            self.reporter.info(
                f"already trained to step {self.state.step} (trainer.max_steps={self.cfg.max_steps}): "
                "nothing left to train"
            )
        if self.state.step == 0 and self.cfg.eval_every:
            # the starting point learning is judged against
            result.evals.append(self.evaluator.evaluate(0, generate=False))
        batches = iter(
            self.data.train_loader(
                self.cfg.batch_size,
                self.env.rank,
                self.env.world_size,
                start_sample=self.state.samples_seen,
                pin_memory=self.data.cfg.pin_memory and self.env.device_type == "cuda",
            )
        )
        if self.precision_check is not None:
            self._probe = PrecisionProbe(self.model, self.optimizer)
        self.tracker.start_window()
        self.profiler.plan(self.state.step, self.cfg.max_steps)
        with self.reporter, self.checkpoints.preemption_guard(), self.profiler, self.watchdog:
            while self.state.step < self.cfg.max_steps:
                self.watchdog.step_started(self.state.step + 1)
                self.tracker.step_started()
                micro_batches = [next(batches) for _ in range(self.cfg.grad_accum)]
                packed = [take_stream_pairs(micro) for micro in micro_batches]  # pairs, for packed batches
                self._train_step(micro_batches)
                if self._probe is not None and self._probe.done:
                    self._check_precision()
                self.state.step += 1
                self.state.samples_seen += (
                    sum(pairs or 0 for pairs in packed)
                    if packed[0] is not None
                    else self.cfg.batch_size * self.cfg.grad_accum * self.env.world_size
                )
                step = self.state.step
                if self.nonfinite_streak:
                    self._nonfinite(step)
                self.reporter.advance(step)
                eval_due = self.cfg.eval_every and step % self.cfg.eval_every == 0 and step < self.cfg.max_steps
                if step % self.cfg.log_every == 0 or step == self.cfg.max_steps or eval_due:
                    result.history.append(self._log(step))
                self.watchdog.step_finished()  # eval and checkpoint saves are not timed as steps
                self.profiler.step(step)
                if eval_due:
                    result.evals.append(self.evaluator.evaluate(step, generate=False))
                    self.tracker.start_window()  # eval time is not training throughput
                if self.checkpoints.should_stop():
                    self.checkpoints.save(self.state, reason="preemption")
                    result.preempted = True
                    return result
                if not self.nonfinite_streak:  # never checkpoint in the middle of a blow-up
                    self.checkpoints.maybe_save(self.state, final=step == self.cfg.max_steps)
            self.checkpoints.wait()
        if self._probe is not None:  # no optimizer step happened (e.g. the gradient scaler skipped them all)
            self._probe.remove()
        result.evals.append(self.evaluator.evaluate(self.state.step, generate=self.cfg.eval_generate))
        result.summary = {
            **self.tracker.summary(),
            "final_step": self.state.step,
            **{k: v for k, v in result.evals[-1].items() if k != "step"},
        }
        self.reporter.summary(result.summary)
        return result

    def _train_step(self, micro_batches: list[Batch]) -> None:
        # No host sync and no host-blocking collective here (tests/test_step_sync.py), except the non-finite
        # guard's one flag read when it is on: counts stay tensors and are read at log steps only.
        self.tracker.batch_ready()
        batches = [{k: v.to(self.env.device, non_blocking=True) for k, v in micro.items()} for micro in micro_batches]
        # Normalize by the step's global target-token count so the loss and its gradient are the same at
        # any world size; FSDP averages gradients over ranks, hence the world-size factor. The count's
        # all-reduce runs while the first forward does; waiting on it orders the GPU stream, not the host.
        local_tokens = torch.stack([(batch["labels"] != IGNORE_INDEX).sum() for batch in batches]).sum()
        global_tokens = local_tokens.float()
        reduced = dist.all_reduce(global_tokens, async_op=True) if self.env.world_size > 1 else None
        loss_total = torch.zeros((), device=self.env.device)
        step_flops = 0
        defer_sync = self.cfg.grad_accum_no_sync and len(batches) > 1
        for index, (micro, batch) in enumerate(zip(micro_batches, batches)):
            if defer_sync:  # reduce-scatter only after the last micro-batch's backward
                cast(FSDPModule, self.model).set_requires_gradient_sync(index == len(batches) - 1)
            step_flops += self.flops.flops(micro)
            loss_sum, _ = token_loss(self.model, batch)
            if reduced is not None:
                reduced.wait()
                reduced = None
            loss = loss_sum * self.env.world_size / global_tokens
            self.grad_scaler.scale(loss).backward()
            loss_total += loss_sum.detach()
        self.grad_scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad_norm is not None:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        elif self.cfg.max_nonfinite_steps:  # the guard needs the norm even without clipping
            self._grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None]
            )
        loss_finite, norm_finite = (
            self._finite(loss_total, self._grad_norm)
            if self.cfg.max_nonfinite_steps and self._grad_norm is not None
            else (True, True)
        )
        # An enabled scaler already skips steps whose scaled gradients overflowed (and lowers its scale): that is
        # its normal work, not a blow-up. Then only a non-finite loss counts.
        norm_finite = norm_finite or self.grad_scaler.is_enabled()
        self.tracker.collectives_done()  # the update that follows is this rank's own work
        if loss_finite and norm_finite:
            self.grad_scaler.step(self.optimizer)
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1  # the update is skipped: the weights stay the last finite ones
        self.grad_scaler.update()  # after a skipped step too: it lowers the scale when it found an overflow
        self.tracker.local_work_ended()
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite_streak == 1:  # the first step of a blow-up: find where it started (all ranks)
            self.nonfinite_origin = locate(self.model, batches, self._micro_loss(global_tokens), self.env.world_size)
        self.schedule.step()
        counts = [token_counts(batch) for batch in batches]
        tokens, real = sum(total for total, _ in counts), torch.stack([real for _, real in counts]).sum()
        self.tracker.add_step(loss_total, local_tokens, tokens, real, step_flops)

    def _finite(self, loss_total: torch.Tensor, grad_norm: torch.Tensor) -> tuple[bool, bool]:
        """(loss finite on every rank, global gradient norm finite), the same on every rank.

        Costs one small all-reduce and one host read per step; the two values travel as one tensor so it is
        a single sync. (The gradient norm is already global; the loss is each rank's own.)"""
        norm = _full(grad_norm)
        check = torch.stack([loss_total.detach().float(), norm.detach().float().to(loss_total.device)])
        if self.env.world_size > 1:
            dist.all_reduce(check)  # a NaN/inf anywhere stays non-finite in the sum
        finite = torch.isfinite(check)
        code = int(finite[0] + 2 * finite[1])  # the one host read
        return bool(code & 1), bool(code & 2)

    def _nonfinite(self, step: int) -> None:
        """Count a skipped update; stop the run after ``max_nonfinite_steps`` in a row."""
        self.nonfinite_total += 1
        limit = self.cfg.max_nonfinite_steps
        origin = f"; first non-finite: {self.nonfinite_origin}" if self.nonfinite_origin else ""
        self.reporter.warning(
            f"step {step}: non-finite loss or gradient norm, the optimizer step was skipped "
            f"({self.nonfinite_streak} in a row of at most {limit}, {self.nonfinite_total} in all)"
            f"{origin}"
        )
        if self.nonfinite_streak >= limit:
            self.checkpoints.wait()  # the last finite checkpoint is committed and kept
            raise TrainingDivergedError(
                f"training diverged: {self.nonfinite_streak} steps in a row up to step {step} had a non-finite "
                f"loss or gradient norm (trainer.max_nonfinite_steps={limit}); no checkpoint was saved from them",
                "lower optim.lr or raise trainer.warmup_steps (with trainer.clip_grad_norm set), then resume from "
                "the last checkpoint",
            )

    def _micro_loss(self, global_tokens: torch.Tensor) -> Callable[[Batch], torch.Tensor]:
        """The loss one micro-batch backpropagates in ``_train_step`` (for the non-finite locator)."""

        def loss_of(batch: Batch) -> torch.Tensor:
            loss_sum, _ = token_loss(self.model, batch)
            return loss_sum * self.env.world_size / global_tokens

        return loss_of

    def _check_precision(self) -> None:
        """Compare the first optimizer step with the precision contract; record it in the run dir. A difference
        is a bug of fsdp_kit or torch, not the user's: it is reported, the run goes on."""
        assert self._probe is not None and self.precision_check is not None
        observed, self._probe = self._probe.observed(), None
        problems = compare(self.precision_check.expected, observed)
        if self.env.is_main:
            write_report(
                self.reporter.run_dir / "precision.json",
                self.precision_check.precision,
                self.precision_check.expected,
                observed,
                problems,
            )
        if problems:
            self.reporter.warning(
                f"precision={self.precision_check.precision.value} differs from its contract "
                f"(see precision.json): {'; '.join(problems)}"
            )

    def _log(self, step: int) -> dict[str, Any]:
        record = self.tracker.record(step, lr=float(self.schedule.get_last_lr()[0]))
        if self._grad_norm is not None:
            record["grad_norm"] = float(_full(self._grad_norm))
        if not math.isfinite(cast(float, record["loss"])):
            self.reporter.warning(f"non-finite loss at step {step}")
        self.reporter.log(record)
        return record


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a tensor that may be a DTensor (clip_grad_norm_ returns one under FSDP2)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _requeue() -> None:
    """The hang watchdog's last act on rank 0: under submitit the exit code alone does not requeue the job."""
    print(f"fsdp_kit hang watchdog: {request_requeue()}", flush=True)
