"""Optimizer settings: torch's AdamW or our AnyPrecisionAdamW."""

from __future__ import annotations

from dataclasses import dataclass, field

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
