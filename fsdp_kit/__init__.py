"""fsdp_kit: train large HF models with PyTorch FSDP2 from a config."""

__version__ = "0.1.0"
