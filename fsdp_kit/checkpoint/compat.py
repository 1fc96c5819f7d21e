"""What a resumed run may change: the training settings a checkpoint records, compared with the new run's.

Hyperparameters (learning rate, betas, eps, weight decay) and the schedule's shape are applied to the loaded
optimizer and schedule (they would otherwise silently keep the saved values). The optimizer, the precision
and the optimizer-state layout decide what the shards hold, so a change there is refused before loading, with
the saved and the new value, instead of failing inside DCP as if the shards were damaged.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fsdp_kit.errors import CheckpointError

if TYPE_CHECKING:  # their packages import fsdp_kit.checkpoint (a cycle at run time); torch: preflight needs none
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

    from fsdp_kit.optim.config import OptimConfig
    from fsdp_kit.training.config import TrainerConfig

_HYPER = ("lr", "betas", "eps", "weight_decay")
_SCHEDULE = ("lr_schedule", "warmup_steps", "max_steps", "min_lr_ratio")


def training_settings(optim: OptimConfig, trainer: TrainerConfig, precision: str) -> dict[str, Any]:
    """The settings a checkpoint records (JSON-ready)."""
    layout: dict[str, Any] = {"optimizer": str(optim.name), "precision": str(precision)}
    if optim.name == "anyprecision":
        layout.update(momentum_dtype=str(optim.momentum_dtype), variance_dtype=str(optim.variance_dtype),
                      use_kahan_summation=optim.use_kahan_summation)
        if optim.use_kahan_summation:
            layout["compensation_buffer_dtype"] = str(optim.compensation_buffer_dtype)
    return {"layout": layout,
            "hyper": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay},
            "schedule": {key: (str(getattr(trainer, key)) if key == "lr_schedule" else getattr(trainer, key))
                         for key in _SCHEDULE}}


_KEY = {"optimizer": "optim", "precision": "precision", "momentum_dtype": "optim.momentum_dtype",
        "variance_dtype": "optim.variance_dtype", "use_kahan_summation": "optim.use_kahan_summation",
        "compensation_buffer_dtype": "optim.compensation_buffer_dtype"}


def check_layout(source: Any, saved: dict[str, Any], ours: dict[str, Any]) -> None:
    """Refuse a change of what the shards hold; checkpoints written before settings were recorded pass."""
    saved_layout, our_layout = saved.get("layout"), ours["layout"]
    if not saved_layout:
        return
    differ = [key for key in sorted(set(saved_layout) | set(our_layout))
              if saved_layout.get(key) != our_layout.get(key)]
    if differ:
        # a different optimizer or precision explains everything else that differs: name only that
        differ = [key for key in ("optimizer", "precision") if key in differ] or differ
        was = " ".join(f"{_KEY.get(k, k)}={saved_layout.get(k)}" for k in differ)
        now = " ".join(f"{_KEY.get(k, k)}={our_layout.get(k)}" for k in differ)
        raise CheckpointError(
            f"{source} was saved with {was}, this run uses {now}: its optimizer state cannot be loaded into a "
            "different optimizer/precision (the checkpoint itself is fine, do not delete it)",
            f"resume with {was}, or start a new run dir and initialize from an export (fsdp-kit export) of it")


def changed_settings(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every hyperparameter or schedule setting this run changes."""
    changes = []
    for section, prefix in (("hyper", "optim."), ("schedule", "trainer.")):
        for key, new in ours[section].items():
            old = saved.get(section, {}).get(key, new)
            if old != new:
                changes.append(f"{prefix}{key}: {old} -> {new}")
    return changes


def apply_settings(optimizer: Optimizer, schedule: LRScheduler, ours: dict[str, Any]) -> None:
    """Put this run's hyperparameters into the loaded optimizer and schedule.

    Loading restored the saved ``param_groups`` and the schedule's ``base_lrs``; the schedule's shape
    (warmup, length, kind) lives in its lambda, which is this run's. The current learning rate is
    recomputed now, so the first resumed step already uses the new values."""
    hyper = ours["hyper"]
    for group in optimizer.param_groups:
        group["betas"] = tuple(hyper["betas"])
        group["eps"] = hyper["eps"]
        group["weight_decay"] = hyper["weight_decay"]
        group["initial_lr"] = hyper["lr"]
    schedule.base_lrs = [hyper["lr"] for _ in optimizer.param_groups]
    lambdas = getattr(schedule, "lr_lambdas", None)
    if lambdas is not None:  # LambdaLR (every schedule built by fsdp_kit.optim.build_schedule)
        for group, base, fn in zip(optimizer.param_groups, schedule.base_lrs, lambdas, strict=True):
            group["lr"] = base * fn(schedule.last_epoch)
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    if not all(math.isfinite(group["lr"]) for group in optimizer.param_groups):
        raise CheckpointError(f"the resumed learning rate is not finite ({schedule.get_last_lr()})",
                              "check optim.lr and the trainer.* schedule settings")
