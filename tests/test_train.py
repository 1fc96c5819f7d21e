"""End to end: the CLI, torchrun, pretrained weights, a decoder-only model, learning, generation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, job, run_ranks, train

ROOT = Path(__file__).resolve().parent.parent


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_smoke_run_prints_progress_and_summary(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fsdp_kit.train", f"hydra.run.dir={tmp_path}", "trainer.max_steps=6",
         "trainer.log_every=3", "trainer.eval_every=0", "data.num_examples=256", "data.eval_examples=32"],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 6/6" in result.stdout and "fsdp_kit run summary" in result.stdout
    assert "exact_match" in result.stdout
    summary = _records(tmp_path)[-1]
    assert summary["summary"] and summary["final_step"] == 6 and 0.0 <= summary["exact_match"] <= 1.0
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "step_6" / "fsdp_kit.json").is_file()


def test_fsdp_kit_console_script_runs_training(tmp_path):
    script = Path(sys.executable).parent / "fsdp-kit"
    result = subprocess.run([str(script), "train", f"hydra.run.dir={tmp_path}", "trainer.max_steps=2",
                             "trainer.eval_every=0", "trainer.eval_generate=false", "checkpoint.at_end=false",
                             "data.num_examples=64", "data.eval_examples=16"],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _records(tmp_path)[-1]["final_step"] == 2


def test_torchrun_two_processes_share_one_run_dir(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "fsdp_kit.train", f"hydra.run.dir={tmp_path}", "trainer.max_steps=3", "trainer.batch_size=4",
         "trainer.eval_every=0", "trainer.eval_generate=false", "checkpoint.at_end=false", "data.num_examples=64",
         "data.eval_examples=16"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _records(tmp_path)[-1]
    assert summary["world_size"] == 2 and summary["final_step"] == 3
    assert result.stdout.count("fsdp_kit run summary") == 1, "only rank 0 reports"


def test_decoder_only_model_trains_through_the_same_path(tmp_path):
    results = run_ranks(train, 2, job(tmp_path, "model=gpt2_tiny", "trainer.max_steps=30", "trainer.log_every=10",
                                      "trainer.eval_every=0", "trainer.eval_generate=true", "data.eval_examples=16"))
    losses = results[0].losses
    assert losses[30] < losses[10]
    assert 0.0 <= results[0].summary["exact_match"] <= 1.0
    assert results[0].evals == results[1].evals


def test_the_default_task_is_learned(tmp_path):
    """The `make train` demo in miniature: held-out loss falls far below its start; generation is scored."""
    cfg = job(tmp_path, "trainer.max_steps=150", "trainer.eval_every=150", "trainer.log_every=50",
              "trainer.eval_generate=true", "trainer.batch_size=16", "data.num_examples=4000",
              "data.eval_examples=64", "data.pad_to_max_length=false")
    evals = run_ranks(train, 1, cfg, timeout=300)[0].evals
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 150
    assert evals[-1]["eval_loss"] < 0.3 * evals[0]["eval_loss"], evals
    assert 0.0 <= evals[-1]["exact_match"] <= 1.0


def test_generation_is_synchronized_across_ranks(tmp_path):
    cfg = job(tmp_path, "trainer.max_steps=2", "trainer.eval_generate=true", "data.eval_examples=20")
    results = run_ranks(train, 2, cfg)  # 20 examples over 2 ranks x 4: ranks run unequal real batches
    assert results[0].evals[-1] == results[1].evals[-1]


def _materialized_state(cfg):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from fsdp_kit import distributed
    from fsdp_kit.models.build import build as build_model
    from fsdp_kit.train import shard_and_materialize

    model = build_model(cfg.model)
    with distributed.session(distributed.detect(), cfg.dist, cfg.sharding) as env:
        shard_and_materialize(model, cfg, env)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in state.items()}


def test_pretrained_weights_load_on_rank0_and_land_in_every_shard(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(123)
    config = T5Config(vocab_size=384, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    reference = T5ForConditionalGeneration(config)
    reference.save_pretrained(tmp_path / "pretrained")
    cfg = job(tmp_path, f"model.pretrained={tmp_path / 'pretrained'}")
    state = run_ranks(_materialized_state, 2, cfg)[0]
    expected = reference.state_dict()
    assert set(expected) <= set(state)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_random_init_does_not_depend_on_world_size_or_wrapping(tmp_path):
    one = run_ranks(_materialized_state, 1, job(tmp_path, "wrap=none"))[0]
    two = run_ranks(_materialized_state, 2, job(tmp_path, "wrap=size", "wrap.min_num_params=50000", "ac=full"))[0]
    assert set(one) == set(two)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=0, msg=name)
    assert one["shared.weight"].std() > 0.5  # HF's T5 init (std 1.0), not zeros or garbage


def test_cpu_offload_trains(tmp_path):
    results = run_ranks(train, 2, job(tmp_path, "sharding.cpu_offload=true"))
    assert results[0].losses[4] < results[0].losses[1]


def test_fp16_uses_a_gradient_scaler_that_works_with_fsdp2(tmp_path):
    import warnings

    warnings.filterwarnings("ignore", message="precision=fp16 with T5")
    results = run_ranks(train, 2, job(tmp_path, "precision=fp16", "trainer.max_steps=4"))
    assert all(torch.isfinite(torch.tensor(v)) for v in results[0].losses.values())


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_layers_give_the_eager_losses(tmp_path, capfd):
    # One encoder and one decoder layer: every distinct layer is a compile (the first of each stack differs, it
    # holds the position bias), so this is the cheapest model that still compiles both kinds of layer.
    small = ("model.hf_config.num_layers=1", "model.hf_config.num_decoder_layers=1", "trainer.max_steps=2")
    eager = run_ranks(train, 1, job(tmp_path / "eager", *small))[0].losses
    compiled = run_ranks(train, 1, job(tmp_path / "compiled", *small, "trainer.compile=true"), timeout=400)[0]
    assert "compile=2 layers" in capfd.readouterr().out  # the rank's start-up line: they really were compiled
    assert all(abs(compiled.losses[s] - eager[s]) < 1e-4 for s in eager), (eager, compiled.losses)
