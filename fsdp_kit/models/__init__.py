"""Build a model on the meta device, then fill its local shards with weights.

This file imports nothing: importing ``fsdp_kit.models.config`` (what composing a config does) must not import torch
or transformers. Import from the modules: build (build, hf_config, check_fits, layer_classes), materialize,
objective (token_loss); config is light.
"""
