"""Optimizer settings: torch's AdamW or our AnyPrecisionAdamW."""

from __future__ import annotations

from dataclasses import dataclass, field

from fsdp_kit.checks import check_fields
from fsdp_kit.errors import ConfigError
from fsdp_kit.options import Option


class OptimizerName(Option):
    adamw = "adamw"
    anyprecision = "anyprecision"


class StateDtype(Option):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class OptimConfig:
    name: OptimizerName = OptimizerName.adamw
    """adamw (torch.optim.AdamW) | anyprecision (fsdp_kit.optim.AnyPrecisionAdamW)."""
    lr: float = 1e-3
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    fused: bool | None = None
    """torch AdamW: use the fused kernel (GPU); null lets torch choose."""
    use_kahan_summation: bool = False
    """AnyPrecision: Kahan-compensated parameter updates (keeps tiny bf16 updates)."""
    momentum_dtype: StateDtype = StateDtype.float32
    """AnyPrecision: dtype of the first moment."""
    variance_dtype: StateDtype = StateDtype.bfloat16
    """AnyPrecision: dtype of the second moment."""
    compensation_buffer_dtype: StateDtype = StateDtype.bfloat16
    """AnyPrecision: dtype of the Kahan compensation buffer."""
    chunk_elements: int = 128 * 1024 * 1024
    """AnyPrecision: elements per multi-tensor call. Bounds the optimizer's temporaries (about one chunk
    in fp32); smaller saves memory, larger means fewer kernel launches. Never changes the result."""

    def check(self, prefix: str = "optim.") -> None:
        """Each setting finite and in its range, the betas two numbers in [0, 1) (``prefix``: where
        this config sits in the job)."""
        check_fields(self, prefix, {"lr": ">0", "eps": ">0", "weight_decay": ">=0", "chunk_elements": ">0"})
        if self.name == OptimizerName.anyprecision and self.variance_dtype == StateDtype.float16:
            raise ConfigError(
                f"{prefix}variance_dtype=float16: the second moment (~gradient^2) underflows float16 "
                "(gradients below about 5e-3 give 0) and the update m/eps blows up",
                f"use {prefix}variance_dtype=bfloat16 (same size, float32's range) or float32",
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(
                f"{prefix}betas={self.betas} must be two numbers in [0, 1)", f"pass e.g. {prefix}betas=[0.9,0.999]"
            )
