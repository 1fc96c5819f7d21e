"""Compose jobs from the shipped configs and run them on real process groups (gloo, forked ranks)."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_module
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from ports import free_port

from fsdp_kit.config import TrainConfig, compose_job
from fsdp_kit.run_dir import register_resolvers

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "fsdp_kit" / "configs")

# A small, fast, deterministic job: no dropout, equal-length batches, no eval or checkpoint unless asked.
FAST = [
    "data.num_examples=512",
    "data.eval_examples=32",
    "data.pad_to_max_length=true",
    "data.max_source_len=48",
    "data.max_target_len=8",
    "trainer.batch_size=4",
    "trainer.max_steps=4",
    "trainer.warmup_steps=1",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.eval_generate=false",
    "checkpoint.at_end=false",
    "metrics.progress=false",
]


def compose_cfg(overrides: list[str]):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("train", overrides=overrides)


def job(run_dir: Path | str, *overrides: str, fast: bool = True) -> TrainConfig:
    """A typed job from the shipped configs plus overrides (later overrides win)."""
    return compose_job([*(FAST if fast else []), f"run_dir={run_dir}", *overrides])


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, queue: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        # Plain pickle: torch's multiprocessing reductions would pass tensors as shared-memory handles,
        # which die with this process.
        queue.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException as err:  # report everything, SystemExit included, to the parent
        queue.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world`` forked ranks with a real gloo process group; results by rank.

    A hard deadline: a hung collective ignores gloo's timeout, so stragglers are killed.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, port, queue, args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and not errors:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None and r not in results]
                if dead:
                    errors.append("; ".join(f"rank {r} exited with code {code} without a result" for r, code in dead))
                elif time.monotonic() > deadline:
                    errors.append(f"no result within {timeout}s")
                continue
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}: {value}")
    finally:
        for proc in procs:
            proc.join(timeout=5 if not errors else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[rank] for rank in range(world)]


def train(job_cfg: TrainConfig):
    """Rank body: train and return the FitResult."""
    from fsdp_kit.train import run

    return run(job_cfg)


def signal_after_first_log(proc: subprocess.Popen, run_dir: Path, sig: int, timeout: float = 120) -> str:
    """Send ``sig`` to ``proc`` once training has logged (``metrics.jsonl`` exists); its output after it ends."""
    try:
        deadline = time.monotonic() + timeout
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return output
