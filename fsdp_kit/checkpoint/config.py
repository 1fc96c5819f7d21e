"""When checkpoints are saved, how many are kept, and where a run resumes from."""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_kit.checks import check_fields


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (0: only at the end, if ``at_end``)."""
    at_end: bool = True
    """Save when training finishes."""
    keep: int = 2
    """Complete checkpoints to keep (older ones are deleted after a newer one is committed)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in the run dir, if any) | never | a checkpoint folder."""
    allow_changes: bool = False
    """Resume although what is trained differs from the checkpoint (data file or its content, data seed, global
    batch, accumulation, dropout, seed, lengths): each change is logged. Off: such a resume is refused, naming
    every changed key, since the run dir would no longer say what its earlier steps trained on."""
    async_save: bool = False
    """Overlap saving with training (torch.distributed.checkpoint.async_save)."""

    def check(self, prefix: str = "checkpoint.") -> None:
        """Each setting finite and in its range (``prefix``: where this config sits in the job)."""
        check_fields(self, prefix, {"keep": ">0", "every": ">=0"})
