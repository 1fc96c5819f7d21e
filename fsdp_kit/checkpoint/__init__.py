"""Sharded checkpoints (torch.distributed.checkpoint): atomic commit, keep-last-k, resume, HF export."""

from typing import TYPE_CHECKING

from fsdp_kit._lazy import export_lazily

__all__ = ["EXIT_REQUEUE", "PREEMPTED_MARKER", "CheckpointManager", "RunIdentity", "TrainState", "complete_checkpoints",
           "read_marker"]

# Imported on first use (fsdp_kit/_lazy.py): checkpoint.config alone must not import torch.distributed.checkpoint.
export_lazily(__name__, {"CheckpointManager": "manager", "RunIdentity": "manager", "complete_checkpoints": "manager",
                         "read_marker": "manager", "EXIT_REQUEUE": "preemption", "PREEMPTED_MARKER": "preemption",
                         "TrainState": "state"})

if TYPE_CHECKING:
    from fsdp_kit.checkpoint.manager import CheckpointManager, RunIdentity, complete_checkpoints, read_marker
    from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE, PREEMPTED_MARKER
    from fsdp_kit.checkpoint.state import TrainState
