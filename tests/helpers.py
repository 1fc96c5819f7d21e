"""Compose jobs from the shipped configs and run them on real process groups (gloo, forked ranks); run the
``fsdp-kit`` command line in a forked copy of the test process."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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
        result = fn(*args)
        queue.put((rank, "ok", pickle.dumps((result, _flop_counts()))))
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
                results[rank], counts = pickle.loads(value)
                _keep_flop_counts(counts)
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


def _flop_counts() -> dict:
    """The FLOP counts this rank made or inherited (fsdp_kit.metrics.flops.COUNTED)."""
    flops = sys.modules.get("fsdp_kit.metrics.flops")
    return dict(flops.COUNTED) if flops is not None else {}


def _keep_flop_counts(counts: dict) -> None:
    """Keep the ranks' FLOP counts in this process, so that ranks forked later inherit them: each model and batch
    shape is counted once per test process instead of once per rank and run (about 0.6 s each for the tiny T5)."""
    if counts:
        from fsdp_kit.metrics import flops

        flops.COUNTED.update(counts)


def exit_codes(fn: Callable[..., Any], world: int, *args: Any, timeout: float) -> list[int | None]:
    """Fork ``world`` ranks with a real gloo group (as ``run_ranks`` does) and return their exit codes (-N: killed
    by signal N; None: still running at the deadline, then killed)."""
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, port, queue, args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return codes


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


@dataclass
class Outcome:
    """How a command ended: its exit code and what it wrote."""

    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run_cli(*args: str, cwd: Path | str, env: dict[str, str] | None = None, timeout: float = 180,
            setup: Callable[[], None] | None = None) -> Outcome:
    """``fsdp-kit ARGS`` run from ``cwd`` with ``env`` added, as a user types it: its exit code, stdout and stderr.

    The real entry point (``fsdp_kit.cli.main``) runs in a forked copy of this process: a process of its own (its
    own cwd, environment, Hydra and logging state, file descriptors 1 and 2, exit code) without a new interpreter
    importing torch and transformers again (seconds per command). Tests of what only a new process shows (the
    console script itself, signals, imports) run the command with ``subprocess`` instead. ``setup`` runs in the
    child first (e.g. a resource limit that must not reach the test process).
    """
    with tempfile.TemporaryDirectory(prefix="fsdp_kit_cli_") as scratch:
        out_path, err_path = Path(scratch) / "stdout", Path(scratch) / "stderr"
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                if setup is not None:
                    setup()
                code = _cli_child(list(args), cwd, env or {}, out_path, err_path)
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:  # a hard deadline, as subprocess.run(timeout=...) has
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"fsdp-kit {' '.join(args)} did not end within {timeout}s")
            time.sleep(0.01)
        return Outcome(os.waitstatus_to_exitcode(status), out_path.read_text(errors="replace"),
                       err_path.read_text(errors="replace"))


def _cli_child(args: list[str], cwd: Path | str, env: dict[str, str], out_path: Path, err_path: Path) -> int:
    """In the forked child: set up what a fresh ``fsdp-kit`` process would have, run ``main(args)``, flush."""
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    # pytest's capture replaced sys.stdout/sys.stderr and records warnings and log records: undo all of that
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
    warnings.resetwarnings()  # Python's default filters, and warnings printed to stderr
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.showwarning = _print_warning
    logging.root.handlers.clear()
    logging.root.setLevel(logging.WARNING)
    GlobalHydra.instance().clear()
    os.chdir(cwd)
    os.environ.update(env)
    sys.argv = [str(Path(sys.executable).parent / "fsdp-kit"), *args]
    try:
        from fsdp_kit.cli import main

        code: Any = main(args)
    except SystemExit as exit_:  # what the interpreter makes of it
        code = exit_.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # an uncaught exception: its traceback and exit code 1, as a real process shows it
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code or 0


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
