"""Every check that needs the file system, the data, checkpoints or device facts, run before any process
group, model or job exists. It sits above the component modules, so none of them imports it.

``preflight(job, ...)`` = ``job.validated()`` (values and combinations) + what only this machine can answer.
torch, transformers and the checkpoint manager are imported where a check needs them, so that a value the
config refuses is refused before they are (the Hydra callback imports this module for every run).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from fsdp_kit.checkpoint.compat import check_layout, check_trained, trained_settings, training_settings
from fsdp_kit.checkpoint.marker import read_marker
from fsdp_kit.checkpoint.timeline import complete_checkpoints, resume_source
from fsdp_kit.config import TrainConfig
from fsdp_kit.data.sources import check_source
from fsdp_kit.errors import ConfigError
from fsdp_kit.policies.config import Precision
from fsdp_kit.run_dir import check_unlocked


def preflight(
    job: TrainConfig,
    world_size: int | None = None,
    device_type: str | None = None,
    probe_device: bool = True,
    check_files: bool = True,
) -> TrainConfig:
    """Validate ``job`` for a run on ``world_size`` ranks of ``device_type``; raise one ConfigError/CheckpointError
    naming the problem and the fix.

    ``probe_device=False`` skips asking this machine's GPU (the job runs elsewhere); ``check_files=False``
    skips data and checkpoint paths that only the job's machines can see."""
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    job.validated(world_size)
    if probe_device:
        check_device(job, device_type or _this_device_type())
    check_packages(job)
    if check_files:
        check_source(job.data)
        if job.model.pretrained:
            from fsdp_kit.models.build import check_pretrained  # late: transformers, only for a pretrained model

            check_pretrained(job.model.pretrained)
        check_run_dir(Path(job.run_dir))
        check_resume(job, world_size)
    return job


def _this_device_type() -> str:
    import torch  # late: preflight runs before torch is imported

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(job: TrainConfig, device_type: str) -> None:
    name = job.precision.name
    if name not in (Precision.bf16, Precision.bf16_pure) or device_type != "cuda":
        return
    import torch  # late: preflight runs before torch is imported

    if not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"precision={name} needs bf16, which {torch.cuda.get_device_name()} does not support",
            "use precision=fp16 (with its gradient scaler) or precision=fp32",
        )


def check_packages(job: TrainConfig) -> None:
    """Optional extras the config asks for are installed."""
    if job.metrics.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                "metrics.tensorboard=true needs the tensorboard package",
                "pip install 'fsdp_kit[tensorboard]' or set metrics.tensorboard=false",
            ) from err
    if job.metrics.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                "metrics.wandb=true needs the wandb package", "pip install 'fsdp_kit[wandb]' or set metrics.wandb=false"
            ) from err


def check_resume(job: TrainConfig, world_size: int = 1) -> None:
    resume = job.checkpoint.resume
    root = Path(job.run_dir) / "checkpoints"
    existing = complete_checkpoints(root)
    if resume == "never" and existing:
        raise ConfigError(
            f"{existing[-1].parent} already holds checkpoints and checkpoint.resume=never would overwrite them",
            "use checkpoint.resume=auto to continue, or a new run dir (hydra.run.dir=...)",
        )
    found = resume_source(resume, root)  # the run dir's own newest save wins over a path applied at a first start
    if found is not None:
        meta = read_marker(found.path)  # raises CheckpointError naming what is missing or corrupt
        # a different optimizer or precision: say so now, not as "damaged shards" after the model is built
        saved = meta.get("training") or {}
        check_layout(found.path, saved, training_settings(job.optim, job.trainer, job.precision.name))
        ours = trained_settings(job, world_size)
        if job.trainer.auto_batch:  # the batch is found after start-up; the trainer's own check compares it
            del ours["trainer.global_batch"]
        check_trained(found.path, saved.get("trained"), ours, job.checkpoint.allow_changes)


def check_run_dir(run_dir: Path) -> None:
    """The run dir and its checkpoints/ can be written (else a run fails at its first save, after training),
    and no other run is writing there. Also run by the Hydra callback before Hydra writes into the run dir."""
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is a file, not a folder", "use another run dir (hydra.run.dir=...)")
    nearest = run_dir  # the folder the run dir will be created in, when it does not exist yet
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(
            f"{nearest} is a file, so the run dir {run_dir} cannot be created inside it",
            "use another run dir (hydra.run.dir=...)",
        )
    check_link(run_dir / "checkpoints")
    for folder in (nearest, run_dir / "checkpoints"):
        if folder.is_dir():
            try:
                with tempfile.TemporaryFile(dir=folder):  # the only reliable test (ACLs, read-only mounts)
                    pass
            except OSError as err:
                raise ConfigError(
                    f"{folder} is not writable ({err.strerror})",
                    "fix its permissions or use another run dir (hydra.run.dir=...)",
                ) from err
    if os.environ.get("RANK", "0") == "0":  # other ranks would see rank 0's own lock
        check_unlocked(run_dir)


def check_link(folder: Path) -> None:
    """A symlinked folder leads somewhere: a link to storage not mounted on this node, or a loop, would pass every
    other check and fail at the first save, after training."""
    if not folder.is_symlink():
        return
    try:
        folder.stat()
    except OSError as err:
        what = (
            "is a symlink loop"
            if err.errno == errno.ELOOP
            else f"is a symlink to {os.readlink(folder)}, which does not exist (storage not mounted on this node?)"
        )
        raise ConfigError(
            f"{folder} {what}, so no checkpoint could be saved",
            "mount the storage it points to, or replace the link with a folder",
        ) from err
