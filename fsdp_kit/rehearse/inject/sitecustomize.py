"""Loaded by every Python process of a job that puts this folder on PYTHONPATH (the multi-node tests and
``fsdp-kit rehearse`` do; a real job never does): fault injection and the rehearsal's per-rank record, each only
where its environment variable asks for it (fsdp_kit/rehearse/faults.py, fsdp_kit/rehearse/probe.py)."""

import os

if os.environ.get("FSDP_KIT_TEST_FAULT"):
    from fsdp_kit.rehearse import faults

    faults.install()
if os.environ.get("FSDP_KIT_REHEARSE_PROBE"):
    from fsdp_kit.rehearse import probe

    probe.install()
