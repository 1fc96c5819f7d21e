"""Precision recipes: the dtype the weights live in, and FSDP2's mixed-precision policy."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from fsdp_kit.policies.config import Precision, PrecisionConfig

_COMPUTE_DTYPE = {
    Precision.fp32: torch.float32,
    Precision.bf16: torch.bfloat16,
    Precision.fp16: torch.float16,
    Precision.bf16_pure: torch.bfloat16,
}


def param_dtype(cfg: PrecisionConfig) -> torch.dtype:
    """The dtype of the sharded (master) weights the optimizer updates."""
    return torch.bfloat16 if cfg.name == Precision.bf16_pure else torch.float32


def compute_dtype(cfg: PrecisionConfig) -> torch.dtype:
    return _COMPUTE_DTYPE[cfg.name]


def mixed_precision_policy(cfg: PrecisionConfig) -> MixedPrecisionPolicy:
    """fp32 master weights cast to the compute dtype for forward/backward, gradients reduced in fp32."""
    if cfg.name in (Precision.bf16, Precision.fp16):
        return MixedPrecisionPolicy(param_dtype=compute_dtype(cfg), reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def keep_fp32_policy(cfg: PrecisionConfig) -> MixedPrecisionPolicy | None:
    """The policy of the modules a HF model keeps in fp32 (``_keep_in_fp32_modules``): fp32 compute and reduction
    under the mixed presets; None where there is nothing to keep (fp32 already; bf16_pure stores them in bf16, as
    ``from_pretrained`` in bf16 does)."""
    if cfg.name in (Precision.bf16, Precision.fp16):
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    return None


def needs_grad_scaler(cfg: PrecisionConfig) -> bool:
    return cfg.name == Precision.fp16
