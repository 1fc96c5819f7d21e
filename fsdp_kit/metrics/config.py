"""What is reported and where."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MetricsConfig:
    peak_tflops: float | None = None
    """Dense peak TFLOPS of one device for MFU; null looks it up (unknown devices report no MFU)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <run_dir>/tensorboard (needs the [tensorboard] extra)."""
    progress: bool = True
    """Live progress bar on rank 0 (a line per log step when the output is not a terminal)."""
