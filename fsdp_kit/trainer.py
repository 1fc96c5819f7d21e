"""The training loop. It owns stepping, evaluation and the cadence of logs and checkpoints, nothing else."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fsdp_kit.checkpoint import Manager, TrainState
from fsdp_kit.config import TrainerConfig
from fsdp_kit.data import DataBundle
from fsdp_kit.data.loader import token_counts
from fsdp_kit.distributed import DistEnv
from fsdp_kit.metrics import FlopCounter, Reporter, Tracker
from fsdp_kit.models.objective import IGNORE_INDEX, token_loss

Batch = dict[str, torch.Tensor]


@dataclass
class FitResult:
    """What a run produced. Losses and evals are global (equal on every rank); timings and memory are each
    rank's own, and rank 0's are the ones reported."""

    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    preempted: bool = False

    @property
    def losses(self) -> dict[int, float]:
        return {record["step"]: record["loss"] for record in self.history}


class Trainer:
    def __init__(self, model: nn.Module, optimizer: Optimizer, schedule: LRScheduler, data: DataBundle,
                 cfg: TrainerConfig, env: DistEnv, flops: FlopCounter, tracker: Tracker, reporter: Reporter,
                 checkpoints: Manager, grad_scaler: torch.amp.GradScaler | None = None) -> None:
        self.model, self.optimizer, self.schedule, self.data = model, optimizer, schedule, data
        self.cfg, self.env, self.flops, self.tracker, self.reporter = cfg, env, flops, tracker, reporter
        self.checkpoints, self.grad_scaler = checkpoints, grad_scaler
        self.state = TrainState(model, optimizer, schedule, grad_scaler)
        self._grad_norm: torch.Tensor | None = None

    def fit(self) -> FitResult:
        result = FitResult()
        self.checkpoints.restore(self.state)
        if self.state.step >= self.cfg.max_steps:
            self.reporter.info(f"already trained to step {self.state.step} (trainer.max_steps={self.cfg.max_steps})")
        if self.state.step == 0 and self.cfg.eval_every:
            result.evals.append(self._evaluate(0, generate=False))  # the starting point learning is judged against
        batches = iter(self.data.train_loader(self.cfg.batch_size, self.env.rank, self.env.world_size,
                                              start_sample=self.state.samples_seen,
                                              pin_memory=self.env.device_type == "cuda"))
        self.tracker.start_window()
        with self.reporter, self.checkpoints.preemption_guard():
            while self.state.step < self.cfg.max_steps:
                self._train_step([next(batches) for _ in range(self.cfg.grad_accum)])
                self.state.step += 1
                self.state.samples_seen += self.cfg.batch_size * self.cfg.grad_accum * self.env.world_size
                step = self.state.step
                self.reporter.advance(step)
                eval_due = self.cfg.eval_every and step % self.cfg.eval_every == 0 and step < self.cfg.max_steps
                if step % self.cfg.log_every == 0 or step == self.cfg.max_steps or eval_due:
                    result.history.append(self._log(step))
                if eval_due:
                    result.evals.append(self._evaluate(step, generate=False))
                    self.tracker.start_window()  # eval time is not training throughput
                if self.checkpoints.should_stop():
                    self.checkpoints.save(self.state, reason="preemption")
                    result.preempted = True
                    return result
                self.checkpoints.maybe_save(self.state, final=step == self.cfg.max_steps)
            self.checkpoints.wait()
        result.evals.append(self._evaluate(self.state.step, generate=self.cfg.eval_generate))
        result.summary = {**self.tracker.summary(), "final_step": self.state.step,
                          **{k: v for k, v in result.evals[-1].items() if k != "step"}}
        self.reporter.summary(result.summary)
        return result

    def _train_step(self, micro_batches: list[Batch]) -> None:
        # No host sync and no host-blocking collective here (tests/test_step_sync.py): counts stay tensors
        # and are read at log steps only.
        batches = [{k: v.to(self.env.device, non_blocking=True) for k, v in micro.items()} for micro in micro_batches]
        # Normalize by the step's global target-token count so the loss and its gradient are the same at
        # any world size; FSDP averages gradients over ranks, hence the world-size factor. The count's
        # all-reduce runs while the first forward does; waiting on it orders the GPU stream, not the host.
        local_tokens = torch.stack([(batch["labels"] != IGNORE_INDEX).sum() for batch in batches]).sum()
        global_tokens = local_tokens.float()
        reduced = dist.all_reduce(global_tokens, async_op=True) if self.env.world_size > 1 else None
        loss_total = torch.zeros((), device=self.env.device)
        step_flops = 0
        for micro, batch in zip(micro_batches, batches):
            step_flops += self.flops.flops(micro)
            loss_sum, _ = token_loss(self.model, batch)
            if reduced is not None:
                reduced.wait()
                reduced = None
            loss = loss_sum * self.env.world_size / global_tokens
            (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()
            loss_total += loss_sum.detach()
        if self.grad_scaler:
            self.grad_scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad_norm is not None:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
        if self.grad_scaler:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        counts = [token_counts(batch) for batch in batches]
        tokens, real = sum(total for total, _ in counts), torch.stack([real for _, real in counts]).sum()
        self.tracker.add_step(loss_total, local_tokens, tokens, real, step_flops)

    def _log(self, step: int) -> dict[str, Any]:
        record = self.tracker.record(step, lr=self.schedule.get_last_lr()[0])
        if self._grad_norm is not None:
            norm = self._grad_norm.full_tensor() if isinstance(self._grad_norm, DTensor) else self._grad_norm
            record["grad_norm"] = float(norm)
        if not math.isfinite(record["loss"]):
            self.reporter.info(f"[bold red]warning:[/] non-finite loss at step {step}")
        self.reporter.log(record)
        return record

    @torch.no_grad()
    def _evaluate(self, step: int, generate: bool) -> dict[str, Any]:
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        loader = self.data.eval_loader(self.cfg.batch_size, self.env.rank, self.env.world_size)
        for index, micro in enumerate(loader):
            if index == self.cfg.eval_batches:
                break
            batch = {k: v.to(self.env.device) for k, v in micro.items()}
            loss_sum, count = token_loss(self.model, batch)
            totals += torch.stack([loss_sum.double(), count.double()])
        if self.env.world_size > 1:
            dist.all_reduce(totals)
        record: dict[str, Any] = {"step": step, "eval_loss": float(totals[0] / totals[1].clamp(min=1))}
        if generate and self.data.eval_pairs is not None:
            record["exact_match"] = self._exact_match()
        self.model.train()
        self.reporter.eval(record)
        return record

    def _exact_match(self) -> float:
        """Greedy generation on the held-out split; every rank runs the same number of batches."""
        if not getattr(self.model, "_fsdp_kit_generate_registered", False):
            register_fsdp_forward_method(self.model, "generate")
            self.model._fsdp_kit_generate_registered = True
        pairs, size = self.data.eval_pairs, self.cfg.batch_size
        max_new_tokens = self.cfg.max_new_tokens or self.data.cfg.max_target_len
        per_round = size * self.env.world_size
        hits = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for start in range(0, len(pairs), per_round):
            mine = list(range(start + self.env.rank * size, min(start + (self.env.rank + 1) * size, len(pairs))))
            indices = mine or [0]  # keep collectives in step; the stand-in is not counted
            prompts = self.data.collate.prompts([self.data.eval[i] for i in indices], self.env.device)
            output = self.model.generate(**prompts, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                         synced_gpus=self.env.world_size > 1)
            if not self.model.config.is_encoder_decoder:
                output = output[:, prompts["input_ids"].shape[1]:]
            texts = self.data.tokenizer.batch_decode(output, skip_special_tokens=True)
            for i, text in zip(mine, texts):
                hits[0] += float(text.strip() == pairs[i][1].strip())
            hits[1] += len(mine)
        if self.env.world_size > 1:
            dist.all_reduce(hits)
        return float(hits[0] / hits[1].clamp(min=1))
