"""Honest numbers: counted FLOPs, synchronized timers, peak memory; JSONL, console and TensorBoard sinks.

This file imports nothing: importing ``fsdp_kit.metrics.config`` (what composing a config does) must not import
torch or transformers. Import from the modules: flops (FlopCounter), peak (peak_tflops), report (Reporter), tracker
(Tracker), closed_form (closed_form_flops); config is light.
"""
