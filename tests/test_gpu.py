"""GPU-only checks (skipped on CPU machines): CUDA training, MFU against the peak table, memory reporting."""

from __future__ import annotations

import pytest
import torch
from helpers import job

from fsdp_kit.train import run

pytestmark = pytest.mark.gpu


def test_tiny_t5_trains_in_bf16_on_the_gpu_and_reports_mfu(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    result = run(job(tmp_path, "precision=bf16", "ac=full", "trainer.max_steps=6", "trainer.log_every=3"))
    assert result.losses[6] < result.losses[3]
    summary = result.summary
    assert summary["device"] == torch.cuda.get_device_name()
    assert summary["peak_mem_gb"] > 0 and summary["peak_reserved_gb"] >= summary["peak_mem_gb"]
    known = any(name in summary["device"] for name in ("H100", "H200", "A100", "A10G", "L4"))
    assert (summary["mfu"] is not None) == known


def test_pure_bf16_anyprecision_on_the_gpu(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    result = run(job(tmp_path, "precision=bf16_pure", "optim=anyprecision", "trainer.max_steps=6"))
    assert result.losses[6] < result.losses[1]
