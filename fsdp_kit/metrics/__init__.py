"""Honest numbers: counted FLOPs, synchronized timers, peak memory; JSONL, console and TensorBoard sinks."""

from typing import TYPE_CHECKING

from fsdp_kit._lazy import export_lazily

__all__ = ["FlopCounter", "Reporter", "Tracker", "closed_form_flops", "peak_tflops", "synchronize",
           "t5_closed_form_flops"]

# Imported on first use (fsdp_kit/_lazy.py): metrics.config alone must not import torch or transformers.
export_lazily(__name__, {"FlopCounter": "flops", "t5_closed_form_flops": "closed_form",
                         "closed_form_flops": "closed_form", "peak_tflops": "peak",
                         "Reporter": "report", "Tracker": "tracker", "synchronize": "tracker"})

if TYPE_CHECKING:
    from fsdp_kit.metrics.closed_form import closed_form_flops, t5_closed_form_flops
    from fsdp_kit.metrics.flops import FlopCounter
    from fsdp_kit.metrics.peak import peak_tflops
    from fsdp_kit.metrics.report import Reporter
    from fsdp_kit.metrics.tracker import Tracker, synchronize
