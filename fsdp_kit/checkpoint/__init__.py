"""Sharded checkpoints (torch.distributed.checkpoint): atomic commit, keep-last-k, resume, HF export.

This file imports nothing: importing ``fsdp_kit.checkpoint.config`` (what composing a config does) must not import
torch or transformers. Import from the modules: manager (CheckpointManager, RunIdentity), state (TrainState),
preemption, export; config is light.
"""
