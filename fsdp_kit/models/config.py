"""What model to train: a preset shape (random init) or pretrained weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsdp_kit.checks import check_fields


@dataclass
class ModelConfig:
    name: str = "t5_tiny"
    """Preset name (display and run naming only)."""
    arch: str = "t5"
    """HF ``model_type`` used to build a random-init model from ``hf_config`` (ignored with ``pretrained``)."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the HF config class, e.g. the T5 shape (d_model, d_ff, num_layers, ...)."""
    pretrained: str | None = None
    """HF hub name or local folder to start from real weights; overrides ``arch``/``hf_config``."""
    dropout: float | None = None
    """Dropout probability for every dropout the model has; null keeps the preset's. 0 makes runs
    comparable across world sizes."""
    attn_implementation: str | None = None
    """Attention kernel path: sdpa (torch's scaled_dot_product_attention; transformers' default for T5, carrying
    the position bias as a float mask), eager, flex_attention; null lets transformers choose."""
    trust_remote_code: bool = False
    """Allow ``pretrained`` to run code from the hub. Off by default: remote code runs as you."""

    def check(self, prefix: str = "model.") -> None:
        """Each setting finite and in its range (``prefix``: where this config sits in the job)."""
        check_fields(self, prefix, {"dropout": "[0,1)"})
