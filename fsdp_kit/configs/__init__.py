"""Hydra configs shipped with fsdp_kit (found as pkg://fsdp_kit.configs from any directory)."""
