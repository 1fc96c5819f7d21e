"""Sharded checkpoints (torch.distributed.checkpoint): atomic commit, keep-last-k, resume, HF export."""

from fsdp_kit.checkpoint.manager import Manager, RunIdentity, complete_checkpoints, read_marker
from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE, PREEMPTED_MARKER
from fsdp_kit.checkpoint.state import TrainState

__all__ = ["EXIT_REQUEUE", "PREEMPTED_MARKER", "Manager", "RunIdentity", "TrainState", "complete_checkpoints",
           "read_marker"]
