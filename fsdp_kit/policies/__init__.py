"""The policy layer: wrapping, precision, sharding and activation checkpointing, as plain torch objects."""

from typing import TYPE_CHECKING

from fsdp_kit._lazy import export_lazily

__all__ = ["Applied", "Policies", "apply_policies", "check_policies", "reshard_all"]

# Imported on first use (fsdp_kit/_lazy.py): policies.config alone must not import torch.
export_lazily(__name__, dict.fromkeys(__all__, "apply"))

if TYPE_CHECKING:
    from fsdp_kit.policies.apply import Applied, Policies, apply_policies, check_policies, reshard_all
