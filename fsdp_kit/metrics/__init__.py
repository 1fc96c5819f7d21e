"""Honest numbers: counted FLOPs, synchronized timers, peak memory; JSONL, console and TensorBoard sinks."""

from fsdp_kit.metrics.flops import FlopCounter, t5_closed_form_flops
from fsdp_kit.metrics.peak import peak_tflops
from fsdp_kit.metrics.report import Reporter
from fsdp_kit.metrics.tracker import Tracker, synchronize

__all__ = ["FlopCounter", "Reporter", "Tracker", "peak_tflops", "synchronize", "t5_closed_form_flops"]
