"""The policy layer: wrapping, precision, sharding and activation checkpointing, as plain torch objects.

This file imports nothing: importing ``fsdp_kit.policies.config`` (what composing a config does) must not import
torch or transformers. Import from the modules: apply (Policies, apply_policies, check_policies), wrapping,
precision, sharding, activation, contract; config is light.
"""
