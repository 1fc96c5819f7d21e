"""FLOPs are counted, not guessed; MFU is reported only against a known peak; metrics.jsonl has its keys."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import job, run_ranks, train

import fsdp_kit.metrics.flops as flops_module
from fsdp_kit.metrics.closed_form import t5_closed_form_flops
from fsdp_kit.metrics.flops import FlopCounter
from fsdp_kit.metrics.peak import peak_tflops
from fsdp_kit.models.build import hf_config


@pytest.fixture()
def uncounted(monkeypatch):
    """No FLOP counts kept from earlier runs in this process: the counter under test counts."""
    monkeypatch.setattr(flops_module, "COUNTED", {})


def _batch(b: int, s: int, t: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.zeros(b, s, dtype=torch.long), "attention_mask": torch.ones(b, s, dtype=torch.long),
            "decoder_input_ids": torch.zeros(b, t, dtype=torch.long), "labels": torch.zeros(b, t, dtype=torch.long)}


@pytest.mark.parametrize(("preset", "shape"), [("t5_tiny", (4, 48, 8)), ("t5_small", (2, 512, 128)),
                                               ("t5_3b", (1, 512, 128))])
def test_flop_counter_equals_the_t5_closed_form(preset, shape, tmp_path, uncounted):
    cfg = job(tmp_path, f"model={preset}").model
    config = hf_config(cfg)
    counted = FlopCounter(cfg, config).flops(_batch(*shape))
    assert counted == t5_closed_form_flops(config, *shape)


def test_t5_3b_model_flops_per_sample_match_design(tmp_path):
    cfg = job(tmp_path, "model=t5_3b").model
    flops = t5_closed_form_flops(hf_config(cfg), 1, 512, 128)
    assert 5.8e12 < flops < 5.9e12  # DESIGN.md: 5.86e12 per sample at 512/128


def test_flop_counter_caches_per_shape(tmp_path, uncounted):
    cfg = job(tmp_path).model
    counter = FlopCounter(cfg, hf_config(cfg))
    small, big = counter.flops(_batch(2, 16, 8)), counter.flops(_batch(2, 32, 8))
    assert big > small and counter.flops(_batch(2, 16, 8)) == small and len(counter._cache) == 2


def test_peak_table_and_unknown_devices():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("cpu") is None  # no MFU rather than a made-up one
    assert peak_tflops("cpu", override=1.5) == 1.5


def test_metrics_jsonl_has_the_documented_keys_and_a_summary_line(tmp_path):
    run_ranks(train, 2, job(tmp_path, "trainer.max_steps=3", "trainer.eval_every=2", "metrics.peak_tflops=2.0"))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r and "summary" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        documented = {"step", "loss", "lr", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_mem_gb", "step_time_s"}
        assert documented <= set(record)
        assert record["tflops_per_gpu"] > 0 and record["tokens_per_s"] > 0 and record["peak_mem_gb"] > 0
        assert record["mfu"] == pytest.approx(record["tflops_per_gpu"] / 2.0)
    assert any("eval_loss" in r for r in lines)
    assert lines[-1]["summary"] is True and lines[-1]["world_size"] == 2
    assert (tmp_path / "resolved_config.yaml").is_file()


def test_tensorboard_scalars_are_written(tmp_path):
    run_ranks(train, 1, job(tmp_path, "trainer.max_steps=2", "metrics.tensorboard=true"))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def _train_with_a_slow_rank(cfg, slow_rank: int, delay_s: float):
    """Rank body: train, ``slow_rank`` taking ``delay_s`` longer to fetch each batch (a slow disk or data worker)."""
    import time

    from fsdp_kit.data.loader import DataBundle

    if int(os.environ["RANK"]) == slow_rank:
        loader = DataBundle.train_loader

        def slow_loader(self, *args, **kwargs):
            for batch in loader(self, *args, **kwargs):
                time.sleep(delay_s)
                yield batch

        DataBundle.train_loader = slow_loader  # a forked rank: the change dies with it
    return train(cfg)


def test_the_slowest_rank_is_named_in_every_log_line_and_the_summary(tmp_path):
    cfg = job(tmp_path, "trainer.max_steps=6", "trainer.log_every=3")
    summary = run_ranks(_train_with_a_slow_rank, 3, cfg, 1, 0.15)[0].summary
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r and "summary" not in r]
    assert [r["step"] for r in steps] == [3, 6]
    for record in [*steps, lines[-1]]:
        assert record["slowest_rank"] == 1, record
        local = record["rank_local_s_median"]
        assert local[1] >= 0.15, local  # the delay counts as rank 1's own time, and rank 1 is named for it
        assert len(record["rank_step_time_s_median"]) == len(record["rank_local_s_p90"]) == 3
    assert summary["slowest_rank"] == 1
