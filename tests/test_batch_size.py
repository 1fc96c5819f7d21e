"""trainer.auto_batch: the search is real (forward/backward, in-process out-of-memory recovery, ranks agree) and
leaves the run exactly as it found it. A CPU does not run out of memory in a way torch reports, so each test
injects a memory limit that raises torch's own ``torch.OutOfMemoryError`` above a batch size: the device's
stand-in. The search under test is the real one."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import job, run_ranks, train
from torch import nn

import fsdp_kit.train as train_module
from fsdp_kit import distributed
from fsdp_kit.config import TrainConfig
from fsdp_kit.data.loader import build as build_data
from fsdp_kit.models.build import build as build_model
from fsdp_kit.models.build import hf_config
from fsdp_kit.models.objective import token_loss
from fsdp_kit.optim.build import build_optimizer
from fsdp_kit.policies.precision import param_dtype
from fsdp_kit.training.batch_size import search_batch_size, upper_bound


def _too_big(batch: int, limit: int) -> None:
    if batch > limit:
        raise torch.OutOfMemoryError(f"injected: batch {batch} > {limit} does not fit")


def limit_memory(model: nn.Module, limit: int, where: str = "backward") -> None:
    """Raise torch.OutOfMemoryError for batches above ``limit`` in the middle of the forward or of the backward
    pass, after FSDP has gathered (and in backward, reduced) part of the model: the hard cases to recover from."""

    def arm(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if where == "forward":
            _too_big(hidden.shape[0], limit)
        elif hidden.requires_grad:  # not in evaluation
            hidden.register_hook(lambda grad: _too_big(grad.shape[0], limit))

    model.encoder.block[0].register_forward_hook(arm)


def _local_state(model: nn.Module, optimizer) -> dict[str, torch.Tensor]:
    state = {f"param/{n}": p.to_local().detach().clone() for n, p in model.named_parameters()}
    for i, (param, values) in enumerate(optimizer.state.items()):
        for key, value in values.items():
            state[f"optim/{i}/{key}/{tuple(param.shape)}"] = (value.to_local() if hasattr(value, "to_local")
                                                              else value).detach().clone()
    return state


def _search_in_the_middle_of_training(job_cfg: TrainConfig, limit: int):
    """Rank body: a real step, then the search, then compare weights, optimizer state, RNG and data position."""
    runtime = distributed.detect()
    config = hf_config(job_cfg.model)
    model = build_model(job_cfg.model, device="meta", dtype=param_dtype(job_cfg.precision), config=config)
    bundle = build_data(job_cfg.data, config)
    with distributed.session(runtime, job_cfg.dist, job_cfg.sharding) as env:
        train_module.shard_and_materialize(model, job_cfg, env)
        optimizer = build_optimizer(model, job_cfg.optim)
        batches = iter(bundle.train_loader(4, env.rank, env.world_size))
        loss, _ = token_loss(model, next(batches))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(1234 + env.rank)
        before, rng = _local_state(model, optimizer), torch.get_rng_state()
        limit_memory(model, limit)
        found = search_batch_size(model, optimizer, bundle, env.device, env.world_size, start=2, bound=16)
        after = _local_state(model, optimizer)
        same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        grads_dropped = all(p.grad is None for p in model.parameters())
        expected = next(iter(bundle.train_loader(4, env.rank, env.world_size, start_sample=4 * env.world_size)))
        data_same = all(torch.equal(v, expected[k]) for k, v in next(batches).items())
        return found.batch_size, found.probes, same, torch.equal(rng, torch.get_rng_state()), grads_dropped, data_same


def test_search_finds_the_largest_batch_and_leaves_the_run_untouched(tmp_path):
    cfg = job(tmp_path, "optim=anyprecision", "optim.use_kahan_summation=true")
    results = run_ranks(_search_in_the_middle_of_training, 2, cfg, 7)
    expected = 7
    for batch, probes, same_state, same_rng, grads_dropped, data_same in results:
        assert batch == expected, probes
        assert probes[0] == (2, True) and (expected, True) in probes and (expected + 1, False) in probes
        assert same_state, "weights or optimizer state changed"
        assert same_rng and grads_dropped and data_same
    assert results[0][1] == results[1][1], "ranks took different decisions"


def _search_with_rank_limits(limits: list[int]):
    """Rank body: ranks that fit different batches (probes without collectives of their own, so that a rank which
    runs out of memory early cannot leave another waiting inside a forward pass)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        found = search_batch_size(nn.Linear(2, 2), torch.optim.AdamW(nn.Linear(2, 2).parameters()), None,  # type: ignore[arg-type]
                                  torch.device("cpu"), 2, start=3, bound=64, probe=lambda b: _too_big(b, limits[rank]))
        return found.batch_size, found.probes
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_smallest_batch_that_fits_everywhere():
    (batch0, probes0), (batch1, probes1) = run_ranks(_search_with_rank_limits, 2, [20, 13])
    assert batch0 == batch1 == 13 and probes0 == probes1
    assert probes0 == [(3, True), (6, True), (12, True), (24, False), (18, False), (15, False), (13, True),
                       (14, False)]


def test_not_even_batch_one_fits_is_one_error_line():
    from fsdp_kit.errors import ConfigError

    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match=r"not even batch 1 fits.*Fix: use ac=full"):
        search_batch_size(model, optimizer, None, torch.device("cpu"), 1, start=4, bound=64,  # type: ignore[arg-type]
                          probe=lambda batch: _too_big(batch, 0))


def test_search_bound_comes_from_the_config_and_the_held_out_set():
    assert upper_bound(512, 32, 2) == 16
    assert upper_bound(8, 1000, 1) == 8


def _train_with_memory_limit(job_cfg: TrainConfig, limit: int, where: str):
    original = train_module.shard_and_materialize

    def with_limit(model, job_, env):
        applied = original(model, job_, env)
        limit_memory(model, limit, where)
        return applied

    train_module.shard_and_materialize = with_limit  # a forked rank: the change dies with it
    return train(job_cfg)


@pytest.fixture(scope="module")
def trained_at_batch_5(tmp_path_factory):
    return run_ranks(train, 2, job(tmp_path_factory.mktemp("fixed"), "trainer.batch_size=5"))[0]


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_auto_batch_trains_exactly_like_the_batch_it_found_and_records_it(tmp_path, trained_at_batch_5, where):
    """Also the test that the out-of-memory recovery leaves FSDP's own state clean: without it the steps after
    the first diverge (the weights and optimizer state right after the search are equal either way)."""
    auto = job(tmp_path / "auto", "trainer.auto_batch=true", "trainer.batch_size=2")
    searched = run_ranks(_train_with_memory_limit, 2, auto, 5, where)[0]
    assert searched.losses == trained_at_batch_5.losses, "the search changed the training that follows it"
    records = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    event = next(r for r in records if r.get("event") == "auto_batch")
    assert event["batch_size"] == 5 and event["start"] == 2 and [5, True] in event["probes"]
    assert searched.batch_size == 5 and searched.batch_search == event  # returned, not written into the job
    assert "batch_size: 5" in (tmp_path / "auto" / "resolved_config.yaml").read_text()
