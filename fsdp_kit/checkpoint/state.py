"""Everything a run needs to continue exactly: sharded model and optimizer, schedule, scaler, progress, RNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class TrainState:
    """The unit saved and restored. Model and optimizer stay sharded (DTensors): no rank ever holds all
    of either. Progress is counted in optimizer steps and in samples of the data stream, so a run can
    resume at a different world size."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        schedule: LRScheduler,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model, self.optimizer, self.schedule, self.grad_scaler = model, optimizer, schedule, grad_scaler
        self.step = 0
        self.samples_seen = 0

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {
            "model": model_state,
            "optim": optim_state,
            "trainer": {
                "step": self.step,
                "samples_seen": self.samples_seen,
                "schedule": self.schedule.state_dict(),
                "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else {},
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        trainer = state["trainer"]
        self.step, self.samples_seen = int(trainer["step"]), int(trainer["samples_seen"])
        self.schedule.load_state_dict(trainer["schedule"])
        if self.grad_scaler and trainer["grad_scaler"]:
            self.grad_scaler.load_state_dict(trainer["grad_scaler"])


def save_rng(path: Path) -> None:
    """This rank's random generators (dropout masks continue exactly where they stopped)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, path)


def load_rng(path: Path) -> bool:
    """Restore this rank's generators; False if the checkpoint has none for this rank (new world size)."""
    if not path.is_file():
        return False
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True
