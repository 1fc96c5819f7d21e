"""The policy layer: wrapping, precision, sharding and activation checkpointing, as plain torch objects."""

from fsdp_kit.policies.apply import Applied, Policies, apply_policies, check_policies, reshard_all

__all__ = ["Applied", "Policies", "apply_policies", "check_policies", "reshard_all"]
