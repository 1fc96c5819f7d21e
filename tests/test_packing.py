"""data.packing=true: several (source, target) pairs per row give exactly the loss and gradients of the same pairs
unpacked (one process, 2 ranks, gradient accumulation), exact resume counts pairs, and models that cannot pack are
refused before any work."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import job, run_ranks, train

from fsdp_kit.data.loader import GlobalBatchSampler
from fsdp_kit.data.loader import build as build_data
from fsdp_kit.data.packing import take_stream_pairs
from fsdp_kit.errors import ConfigError
from fsdp_kit.models.build import build as build_model
from fsdp_kit.models.build import hf_config
from fsdp_kit.models.objective import token_loss

# Long enough that rows hold several built-in pairs; tiny-model relative-position distances reach past the
# buckets' max_distance within a row, so a bias that did not restart per segment would show.
PACKED = ["data.packing=true", "data.max_source_len=128", "data.max_target_len=32", "data.pad_to_max_length=false"]


def _loss_and_grads(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[float, dict]:
    """Mean token loss over ``batches`` together, and the gradient of it, as the trainer normalizes it."""
    model.zero_grad(set_to_none=True)
    tokens = sum(int((batch["labels"] != -100).sum()) for batch in batches)
    total = 0.0
    for batch in batches:
        loss_sum, _ = token_loss(model, batch)
        (loss_sum / tokens).backward()
        total += loss_sum.item()
    return total / tokens, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_has_the_loss_and_gradients_of_its_pairs_unpacked(attention, tmp_path):
    cfg = job(tmp_path, *PACKED, f"model.attn_implementation={attention}")
    config = hf_config(cfg.model)
    bundle = build_data(cfg.data, config)
    batch = next(iter(bundle.train_loader(4, rank=0, world_size=1)))
    pairs = take_stream_pairs(batch)
    assert pairs >= 8 and int(batch["segment_ids"].max()) >= 2, "rows must hold several pairs for this check"
    segments = batch["decoder_segment_ids"]
    first_of_each = (segments > 0) & (segments != torch.nn.functional.pad(segments, (1, 0))[:, :-1])
    assert (batch["decoder_input_ids"][first_of_each] == config.decoder_start_token_id).all()
    torch.manual_seed(0)
    model = build_model(cfg.model, device="cpu", config=config).float()
    unpacked = bundle.collate([bundle.train[i] for i in _stream(bundle, pairs)])
    assert unpacked["input_ids"].numel() > batch["input_ids"].numel(), "packing saved no padding"
    loss, grads = _loss_and_grads(model, [batch])
    want_loss, want_grads = _loss_and_grads(model, [unpacked])
    assert abs(loss - want_loss) <= 1e-6, (loss, want_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=1e-6, msg=name)


def _stream(bundle, count: int) -> list[int]:
    """The first ``count`` pair indices of the training stream."""
    return next(iter(GlobalBatchSampler(len(bundle.train), count, 0, 1, bundle.cfg.seed)))


def _equal_length_pairs(path, count: int = 600) -> None:
    """Sources of 20 and targets of 4 bytes (21 and 5 tokens with ByT5's end token): exactly 2 pairs per packed row
    at max_source_len=42, so a packed run sees the pairs of an unpacked one with twice the batch, in order."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "headline"])
        for i in range(count):
            writer.writerow([f"item {i:05d} says {i % 7} ok"[:20].ljust(20, "."), f"{i % 9}{i % 5}{i % 3}x"])


def test_packed_training_at_two_ranks_with_accumulation_equals_unpacked_single_process(tmp_path):
    path = tmp_path / "pairs.csv"
    _equal_length_pairs(path)
    shape = ["data=csv", f"data.path={path}", "data.eval_examples=16", "data.max_source_len=42",
             "data.max_target_len=10", "trainer.max_steps=3"]
    packed = run_ranks(train, 2, job(tmp_path / "packed", *shape, "data.packing=true", "data.pad_to_max_length=false",
                                     "trainer.batch_size=2", "trainer.grad_accum=2"))[0]
    unpacked = run_ranks(train, 1, job(tmp_path / "unpacked", *shape, "trainer.batch_size=16"))[0]
    got, want = [packed.losses[s] for s in (1, 2, 3)], [unpacked.losses[s] for s in (1, 2, 3)]
    assert all(abs(g - w) <= 1e-6 for g, w in zip(got, want)), (got, want)
    assert want[-1] < want[0], "the reference did not learn; the comparison would be vacuous"


STEPS = 4
RESUMABLE = [*PACKED, "data.pad_to_max_length=true", f"trainer.max_steps={STEPS}", "model.dropout=0.1",
             "trainer.batch_size=2", "trainer.eval_batches=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("packed")
    cfg = job(run_dir, *RESUMABLE, "checkpoint.every=2")
    return run_dir, run_ranks(train, 2, cfg)[0]


def test_an_interrupted_packed_run_resumes_exactly_where_its_pairs_left_off(uninterrupted, tmp_path):
    run_dir, reference = uninterrupted
    marker = json.loads((run_dir / "checkpoints" / "step_2" / "fsdp_kit.json").read_text())
    assert marker["samples_seen"] > 2 * 2 * 2, "the data position counts pairs, not rows"
    cfg = job(tmp_path, *RESUMABLE, f"checkpoint.resume={run_dir / 'checkpoints' / 'step_2'}")
    resumed = run_ranks(train, 2, cfg)[0]
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert abs(resumed.losses[step] - reference.losses[step]) <= 1e-6, (step, resumed.losses, reference.losses)


@pytest.mark.parametrize(("overrides", "named"), [(["model=gpt2_tiny"], "'gpt2'"),
                                                  (["model.attn_implementation=flex_attention"], "flex_attention")])
def test_models_that_cannot_pack_are_refused_before_any_work(overrides, named, tmp_path):
    from fsdp_kit.train import run

    with pytest.raises(ConfigError, match=named) as refused:
        run(job(tmp_path, "data.packing=true", *overrides))
    assert "\n" not in str(refused.value) and "data.packing=false" in str(refused.value)
    assert not list(tmp_path.iterdir()), "nothing was written"



def test_the_planner_traces_full_packed_rows_with_their_masks():
    from fsdp_kit.config import compose_job
    from fsdp_kit.plan import traced

    def saved(packing: str) -> float:
        profile = traced(compose_job([f"data.packing={packing}"])).activations
        return profile.outside_layers + sum(profile.per_layer)

    assert saved("true") > saved("false"), "a packed row's 4-D masks are part of its activations"
