"""What a resumed run may change: the training settings a checkpoint records, compared with the new run's.

What is trained (the data's identity, the global batch, accumulation, dropout, seeds, lengths; ``trained_settings``)
may not change silently: steps 1..N of the run were trained on the saved values, so a change is refused key by
key unless the user passes ``checkpoint.allow_changes=true``, and is then logged key by key.

Hyperparameters (learning rate, betas, eps, weight decay) and the schedule's shape are applied to the loaded
optimizer and schedule (they would otherwise silently keep the saved values). The optimizer, the precision
and the optimizer-state layout decide what the shards hold, so a change there is refused before loading, with
the saved and the new value, instead of failing inside DCP as if the shards were damaged.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsdp_kit.errors import CheckpointError

if TYPE_CHECKING:  # their packages import fsdp_kit.checkpoint (a cycle at run time); torch: preflight needs none
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

    from fsdp_kit.config import TrainConfig
    from fsdp_kit.data.config import DataConfig
    from fsdp_kit.optim.config import OptimConfig
    from fsdp_kit.training.config import TrainerConfig

_HYPER = ("lr", "betas", "eps", "weight_decay")
_SCHEDULE = ("lr_schedule", "warmup_steps", "max_steps", "min_lr_ratio")


def training_settings(optim: OptimConfig, trainer: TrainerConfig, precision: str) -> dict[str, Any]:
    """The settings a checkpoint records (JSON-ready)."""
    layout: dict[str, Any] = {"optimizer": str(optim.name), "precision": str(precision)}
    if optim.name == "anyprecision":
        layout.update(
            momentum_dtype=str(optim.momentum_dtype),
            variance_dtype=str(optim.variance_dtype),
            use_kahan_summation=optim.use_kahan_summation,
        )
        if optim.use_kahan_summation:
            layout["compensation_buffer_dtype"] = str(optim.compensation_buffer_dtype)
    return {
        "layout": layout,
        "hyper": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay},
        "schedule": {
            key: (str(getattr(trainer, key)) if key == "lr_schedule" else getattr(trainer, key)) for key in _SCHEDULE
        },
    }


_HASHED_BYTES = 1 << 20  # the head of a data file that identifies it (with its size): cheap on any file size


def data_identity(data: DataConfig) -> dict[str, Any]:
    """The data a run trains on, as keys a checkpoint records: the file (path, size, a hash of its first MB) or the
    generator's parameters, the dataset, and how examples are cut."""
    ident: dict[str, Any] = {
        "data.source": str(data.source),
        "data.seed": data.seed,
        "data.tokenizer": data.tokenizer,
        "data.max_source_len": data.max_source_len,
        "data.max_target_len": data.max_target_len,
        "data.source_prefix": data.source_prefix,
    }
    if data.source in ("builtin", "synthetic"):
        ident["data.num_examples"] = data.num_examples
    elif data.source == "hf":
        ident.update(
            {"data.hf_name": data.hf_name, "data.hf_config_name": data.hf_config_name, "data.hf_split": data.hf_split}
        )
    if data.source in ("csv", "jsonl") and data.path:
        path = Path(data.path).resolve()
        with path.open("rb") as handle:
            head = hashlib.sha256(handle.read(_HASHED_BYTES)).hexdigest()
        ident.update(
            {
                "data.path": str(path),
                "data.size": path.stat().st_size,
                "data.sha256_first_mb": head,
                "data.source_column": data.source_column,
                "data.target_column": data.target_column,
                "data.eval_examples": data.eval_examples,
            }
        )  # the file's last rows are held out
    return ident


def trained_settings(job: TrainConfig, world_size: int) -> dict[str, Any]:
    """What decides what is trained, beyond the optimizer: data, global batch, accumulation, dropout, seeds."""
    trainer = job.trainer
    return {
        **data_identity(job.data),
        "trainer.global_batch": trainer.batch_size * trainer.grad_accum * world_size,
        "trainer.grad_accum": trainer.grad_accum,
        "trainer.seed": trainer.seed,
        "trainer.clip_grad_norm": trainer.clip_grad_norm,
        "model.dropout": job.model.dropout,
    }


def check_trained(source: Any, saved: dict[str, Any] | None, ours: dict[str, Any], allow: bool) -> list[str]:
    """Refuse a change of what is trained (``key: saved -> now`` for each) unless ``allow``; the changes.
    Keys one side does not record (older checkpoints, a batch not yet searched) are not compared."""
    changes = [
        f"{key}: {saved[key]!r} -> {value!r}"
        for key, value in ours.items()
        if saved and key in saved and saved[key] != value
    ]
    if changes and not allow:
        raise CheckpointError(
            f"{source} was trained on other settings than this run's: {'; '.join(changes)}",
            "resume with the saved values, start a new run dir, or pass "
            "checkpoint.allow_changes=true if the change is meant (each is then logged)",
        )
    return changes


_KEY = {
    "optimizer": "optim",
    "precision": "precision",
    "momentum_dtype": "optim.momentum_dtype",
    "variance_dtype": "optim.variance_dtype",
    "use_kahan_summation": "optim.use_kahan_summation",
    "compensation_buffer_dtype": "optim.compensation_buffer_dtype",
}


def check_layout(source: Any, saved: dict[str, Any], ours: dict[str, Any]) -> None:
    """Refuse a change of what the shards hold; checkpoints written before settings were recorded pass."""
    saved_layout, our_layout = saved.get("layout"), ours["layout"]
    if not saved_layout:
        return
    differ = [
        key for key in sorted(set(saved_layout) | set(our_layout)) if saved_layout.get(key) != our_layout.get(key)
    ]
    if differ:
        # a different optimizer or precision explains everything else that differs: name only that
        differ = [key for key in ("optimizer", "precision") if key in differ] or differ
        was = " ".join(f"{_KEY.get(k, k)}={saved_layout.get(k)}" for k in differ)
        now = " ".join(f"{_KEY.get(k, k)}={our_layout.get(k)}" for k in differ)
        raise CheckpointError(
            f"{source} was saved with {was}, this run uses {now}: its optimizer state cannot be loaded into a "
            "different optimizer/precision (the checkpoint itself is fine, do not delete it)",
            f"resume with {was}, or start a new run dir and initialize from an export (fsdp-kit export) of it",
        )


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
        from fsdp_kit.torch_private import set_reported_lr  # late: preflight imports this module without torch

        set_reported_lr(schedule, [group["lr"] for group in optimizer.param_groups])
    if not all(math.isfinite(group["lr"]) for group in optimizer.param_groups):
        raise CheckpointError(
            f"the resumed learning rate is not finite ({schedule.get_last_lr()})",
            "check optim.lr and the trainer.* schedule settings",
        )
