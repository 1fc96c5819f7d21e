"""GPU-only checks (skipped on CPU machines, saying why): CUDA training in each precision, MFU against the peak
table, CUDA memory figures, pinned loading, async checkpoints of CUDA tensors, NCCL, the batch search against real
out-of-memory errors. `benchmarks/gpu/run.sh` runs them."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
from helpers import job

from fsdp_kit.data.loader import build as build_data
from fsdp_kit.models.build import hf_config
from fsdp_kit.train import run

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _one_plain_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_t5_trains_in_bf16_on_the_gpu_and_reports_mfu(tmp_path):
    result = run(job(tmp_path, "precision=bf16", "ac=full", "trainer.max_steps=6", "trainer.log_every=3"))
    assert result.losses[6] < result.losses[3]
    summary = result.summary
    assert summary["device"] == torch.cuda.get_device_name()
    assert summary["peak_mem_gb"] > 0 and summary["peak_reserved_gb"] >= summary["peak_mem_gb"]
    known = any(name in summary["device"] for name in ("H100", "H200", "A100", "A10G", "L4"))
    assert (summary["mfu"] is not None) == known


def test_pure_bf16_anyprecision_on_the_gpu(tmp_path):
    result = run(job(tmp_path, "precision=bf16_pure", "optim=anyprecision", "trainer.max_steps=6"))
    assert result.losses[6] < result.losses[1]


def test_fp16_with_the_grad_scaler_on_the_gpu(tmp_path):
    result = run(job(tmp_path, "precision=fp16", "trainer.max_steps=8", "checkpoint.at_end=true"))
    losses = list(result.losses.values())
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    # the scaler ran (fp16 only) and is part of the training state: its scale is saved beside the weights
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(tmp_path / "checkpoints" / "step_8")).read_metadata().state_dict_metadata
    assert any("grad_scaler" in key and key.endswith("scale") for key in keys), sorted(keys)[:20]


def test_cuda_memory_figures_reach_the_metrics(tmp_path):
    run(job(tmp_path, "precision=bf16", "trainer.max_steps=4", "trainer.log_every=2"))
    records = [r for r in _records(tmp_path) if "loss" in r and "peak_mem_gb" in r]
    assert records
    allocated_now = torch.cuda.max_memory_allocated() / 1e9
    for record in records:
        assert 0 < record["peak_mem_gb"] <= allocated_now + 1e-9
        assert record["peak_reserved_gb"] >= record["peak_mem_gb"]


def test_batches_are_loaded_into_pinned_memory_for_the_gpu(tmp_path):
    cfg = job(tmp_path)
    bundle = build_data(cfg.data, hf_config(cfg.model))
    batch = next(iter(bundle.train_loader(4, 0, 1, pin_memory=True)))
    assert all(tensor.is_pinned() for tensor in batch.values())
    moved = {k: v.to("cuda", non_blocking=True) for k, v in batch.items()}
    torch.cuda.synchronize()
    assert all(torch.equal(moved[k].cpu(), batch[k]) for k in batch)


def test_async_checkpoint_of_cuda_tensors_resumes_the_same_losses(tmp_path):
    common = ("precision=bf16", "checkpoint.async_save=true", "checkpoint.every=2")
    straight = run(job(tmp_path / "straight", *common, "trainer.max_steps=6"))
    run(job(tmp_path / "resumed", *common, "trainer.max_steps=4"))
    resumed = run(job(tmp_path / "resumed", *common, "trainer.max_steps=6"))
    assert resumed.losses[6] == pytest.approx(straight.losses[6], rel=1e-6)
    assert (tmp_path / "resumed" / "checkpoints" / "step_4").is_dir()


def test_nccl_initializes_at_world_one_with_a_file_store(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        value = torch.ones(4, device="cuda")
        dist.all_reduce(value)
        assert dist.get_backend() == "nccl" and value.sum().item() == 4
    finally:
        dist.destroy_process_group()


def test_the_training_process_group_is_nccl_on_the_gpu(tmp_path):
    from fsdp_kit import distributed

    cfg = job(tmp_path)
    with distributed.session(distributed.detect(), cfg.dist, cfg.sharding) as env:
        assert env.device_type == "cuda" and dist.get_backend() == "nccl"


def test_batch_search_recovers_from_real_out_of_memory_errors(tmp_path):
    result = run(job(tmp_path, "model=t5_small", "data=synthetic", "data.max_source_len=512",
                     "data.max_target_len=128", "data.eval_examples=4096", "trainer.auto_batch=true",
                     "trainer.auto_batch_max=4096", "precision=bf16", "trainer.max_steps=2"))
    event = next(r for r in _records(tmp_path) if r.get("event") == "auto_batch")
    assert event["start_source"].startswith("the planner"), event
    assert any(not fits for _, fits in event["probes"]), "the search never ran out of memory: raise the bound"
    assert event["batch_size"] >= 1 and math.isfinite(result.losses[2])
