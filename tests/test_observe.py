"""Seeing inside a run and surviving a hung one: the profiler window (trainer.profile) and the hang watchdog."""

from __future__ import annotations

import json
import os
import time

import pytest
from helpers import exit_codes, job, run_ranks, train

from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE
from fsdp_kit.errors import ConfigError


def test_profile_writes_a_chrome_trace_of_the_window(tmp_path, capfd):
    cfg = job(tmp_path, "trainer.max_steps=5", "trainer.profile=true", "trainer.profile_wait=1",
              "trainer.profile_warmup=1", "trainer.profile_active=2")
    run_ranks(train, 1, cfg)
    traces = sorted((tmp_path / "profile").iterdir())
    # one trace, named by the last recorded training step (wait 1 + warmup 1 + active 2)
    assert [path.name for path in traces] == ["trace_rank0_step4.json"]
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {event.get("name", "") for event in events}
    # the profiler numbers its steps from 0: steps #2 and #3 are the active ones, the warmup step is dropped
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names and "ProfilerStep#1" not in names
    assert any(name.startswith("aten::") for name in names), "operator events of the traced steps"
    out = capfd.readouterr().out
    assert "memory snapshot skipped" in out and "cpu" in out
    assert not list((tmp_path / "profile").glob("memory_*"))


def test_a_profile_window_longer_than_the_run_is_refused(tmp_path):
    cfg = job(tmp_path, "trainer.max_steps=4", "trainer.profile=true", "trainer.profile_wait=2",
              "trainer.profile_active=3")
    with pytest.raises(ConfigError, match=r"trainer.profile: the window .* is longer than trainer.max_steps=4"):
        cfg.validated()


HANG_STEP = 3
LATER_S = 3


def _rank_that_hangs(cfg):
    """Rank body: rank 1 sleeps inside training step HANG_STEP (a test-only stand-in for a hung kernel); rank 0
    blocks in that step's first collective.

    Rank 1's watchdog allows LATER_S more than rank 0's, so that rank 0's fires first: on CPU, gloo fails rank 0's
    collective as soon as rank 1's process exits, and rank 0 then ends with that error instead of by its own
    watchdog, which is what this test checks (with equal limits that happened in about one run in three on a busy
    machine: both watchdogs fire about 5 s into the step)."""
    import dataclasses

    from fsdp_kit.training.trainer import Trainer

    if int(os.environ["RANK"]) == 1:
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(
            cfg.trainer, hang_timeout_s=cfg.trainer.hang_timeout_s + LATER_S))
        original = Trainer._train_step

        def hanging_train_step(self, micro_batches):
            if self.state.step + 1 == HANG_STEP:
                time.sleep(300)
            return original(self, micro_batches)

        Trainer._train_step = hanging_train_step  # this forked rank's own copy of the class
    return train(cfg)


def test_hang_watchdog_dumps_stacks_on_every_rank_and_exits_for_requeue(tmp_path, capfd):
    cfg = job(tmp_path, "trainer.max_steps=8", "trainer.hang_timeout_s=5", "trainer.hang_factor=5",
              "checkpoint.every=2")
    started = time.monotonic()
    codes = exit_codes(_rank_that_hangs, 2, cfg, timeout=150)
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], "every rank exits with the requeue code, the blocked one too"
    assert time.monotonic() - started < 120, "the watchdog, not the sleep, ended the ranks"
    hung = (tmp_path / "hang" / "rank1.txt").read_text()
    blocked = (tmp_path / "hang" / "rank0.txt").read_text()
    assert f"in step {HANG_STEP}" in hung and f"in step {HANG_STEP}" in blocked
    assert "in hanging_train_step" in hung, "the sleeping rank's stack shows where it hangs"
    assert "in _train_step" in blocked, "the other rank waits in its step's first collective"
    assert "hang watchdog: rank 1" in capfd.readouterr().err, "the stacks also go to stderr (the job's log)"
    # the requeued job resumes from the checkpoint saved before the hang
    assert (tmp_path / "checkpoints" / "step_2").is_dir()


POISONED = "decoder.block.1.layer.2.DenseReluDense.wo"


def _train_with_overflow(cfg, where: str):
    """Rank body: train with ``POISONED`` (on rank 1 only) overflowing in its forward output or in its output's
    gradient; the console of rank 0."""
    from io import StringIO

    import torch
    from rich.console import Console

    from fsdp_kit import train as train_module

    def overflow(module, args, output):
        if where == "forward":
            return output * torch.tensor(1e39, dtype=output.dtype)  # past float32's largest: inf
        if output.requires_grad:  # not under eval's no_grad
            output.register_hook(lambda grad: grad * float("inf"))
        return output

    shard_and_materialize = train_module.shard_and_materialize

    def poisoned(model, job_cfg, env):
        applied = shard_and_materialize(model, job_cfg, env)
        if env.rank == 1:
            model.get_submodule(POISONED).register_forward_hook(overflow)
        return applied

    train_module.shard_and_materialize = poisoned  # a forked rank: the change dies with it
    console = Console(file=StringIO(), width=400)
    train_module.run(cfg, console=console)
    return console.file.getvalue()


@pytest.mark.parametrize("where,named", [("forward", f"forward output of {POISONED}"),
                                         ("backward", f"gradient of {POISONED}'s output")])
def test_the_first_non_finite_step_names_the_module_where_it_started(where, named, tmp_path):
    cfg = job(tmp_path, "trainer.max_steps=2", "trainer.max_nonfinite_steps=5")
    out = run_ranks(_train_with_overflow, 2, cfg, where)[0]
    warnings = [line for line in out.splitlines() if "non-finite loss or gradient norm" in line]
    assert len(warnings) == 2, out
    assert warnings[0].startswith("warning: step 1:") and warnings[0].endswith(f"first non-finite: {named}"), out
