"""Dense bf16 peak TFLOPS per device, for MFU. Unknown devices get no MFU rather than a guessed one."""

from __future__ import annotations

import torch

# Most specific names first: "H100 PCIe" must match before "H100".
PEAK_DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("L4", 121.0),
)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(name: str, override: float | None = None) -> float | None:
    """The user's value if given, else the table's entry for ``name``, else None (no MFU)."""
    if override is not None:
        return override
    for key, value in PEAK_DENSE_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None
