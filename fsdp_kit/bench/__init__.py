"""``fsdp-kit bench``: the FSDP T5 blog's ablation on the hardware at hand.

For each lever (``levers.py``) the recipe runs with the lever off and on. Each run first finds its largest batch
(``trainer.auto_batch``), then trains a few steps on synthetic data at the benchmark shape (dropout 0, no eval
beyond one batch, no checkpoints); the numbers are the trainer's own (``FitResult.summary``: counted model FLOPs
over synchronized step time, the first log window left out). Runs that compose to the same config are run once.
Every config is composed and validated before the first run, so a bad override costs nothing.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fsdp_kit.bench.levers import BASE, Lever
from fsdp_kit.config import TrainConfig, compose_job, to_yaml
from fsdp_kit.errors import ConfigError, first_line

__all__ = ["OUTPUT_FILES", "BenchRun", "LeverResult", "bench_overrides", "probe_factors", "run_bench"]

OUTPUT_FILES = ("bench.json", "bench.md", "bench.png")

_MEASURED = ("batch_size", "tflops_per_gpu", "tokens_per_s", "real_tokens_per_s", "step_time_s", "mfu", "peak_mem_gb")


def bench_overrides(steps: int) -> list[str]:
    """The bench's settings, before the user's overrides (which win)."""
    return [
        "data=synthetic",
        "model.dropout=0.0",
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",
        "trainer.eval_generate=false",
        "trainer.eval_batches=1",
        "checkpoint.at_end=false",
        "checkpoint.every=0",
        "checkpoint.resume=never",
        "trainer.warmup_steps=0",
        f"trainer.log_every={max(steps // 3, 1)}",
        "metrics.progress=false",
        "trainer.auto_batch=true",
        *BASE,
    ]


@dataclass
class BenchRun:
    """One configuration's measurement."""

    overrides: list[str]
    numbers: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class LeverResult:
    lever: Lever
    off: BenchRun
    on: BenchRun
    probe_factor: float | None

    def gain(self, key: str) -> float | None:
        before, after = self.off.numbers.get(key), self.on.numbers.get(key)
        return after / before if before and after is not None else None

    def as_dict(self) -> dict[str, Any]:
        published = self.lever.published
        return {
            "lever": self.lever.name,
            "what": self.lever.what,
            "off": dataclasses.asdict(self.off),
            "on": dataclasses.asdict(self.on),
            "tflops_gain": self.gain("tflops_per_gpu"),
            "tokens_per_s_gain": self.gain("tokens_per_s"),
            "text_tokens_per_s_gain": self.gain("real_tokens_per_s"),
            "published": dataclasses.asdict(published) if published else None,
            "probe_factor": self.probe_factor,
            "probe_runs": list(self.lever.probe) if self.lever.probe else None,
        }


def probe_factors(reference: Path | None) -> dict[str, float]:
    """TFLOPS by run label from our GPU probe record (benchmarks/results/gpu_probe_*.json), if at hand; a file of
    another shape is one ConfigError (``fsdp-kit bench`` reads it before measuring anything)."""
    if reference is None or not reference.is_file():
        return {}
    fix = "pass a gpu_probe_*.json record from benchmarks/results/, or leave --reference out"
    try:
        record = json.loads(reference.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--reference {reference} is not JSON ({first_line(err)})", fix) from err
    runs = record.get("runs") if isinstance(record, dict) else None
    if not isinstance(runs, list) or not all(
        isinstance(run, dict) and isinstance(run.get("label"), str) and isinstance(run.get("tflops"), (int, float))
        for run in runs
    ):
        raise ConfigError(
            f'--reference {reference} is not a GPU probe record (a "runs" list of {{"label", "tflops"}} objects)', fix
        )
    return {run["label"]: run["tflops"] for run in runs}


def run_bench(
    levers: list[Lever],
    overrides: list[str],
    steps: int,
    reference: Path | None = None,
    log: Callable[[str], None] = print,
    done: Callable[[list[LeverResult]], object] | None = None,
) -> list[LeverResult]:
    """Measure each lever off and on; ``overrides`` apply to every run (model=..., data lengths, ...).
    ``done`` gets the results so far after each lever."""
    sides = {
        (lever.name, side): [*bench_overrides(steps), *overrides, *getattr(lever, side)]
        for lever in levers
        for side in ("off", "on")
    }
    jobs = {key: compose_job(value) for key, value in sides.items()}  # all errors before the first run
    for job in jobs.values():
        job.validated()
    probe = probe_factors(reference)
    identities = {key: _identity(job) for key, job in jobs.items()}
    measured: dict[str, BenchRun] = {}
    results: list[LeverResult] = []
    with tempfile.TemporaryDirectory(prefix="fsdp_kit_bench_") as scratch:
        for lever in levers:
            for side in ("off", "on"):
                key = (lever.name, side)
                if identities[key] in measured:
                    continue
                job = dataclasses.replace(jobs[key], run_dir=str(Path(scratch) / f"{lever.name}_{side}"))
                log(f"bench: {lever.name} {side}: {' '.join(getattr(lever, side))}")
                measured[identities[key]] = _measure(job, sides[key])
                numbers = measured[identities[key]].numbers
                error = measured[identities[key]].error
                log(
                    f"bench:   FAILED: {error}"
                    if error
                    else f"bench:   batch {numbers['batch_size']}, "
                    f"{_fmt(numbers['tflops_per_gpu'])} TFLOPS, {_fmt(numbers['tokens_per_s'])} tokens/s"
                )
                _release()
            off, on = (measured[identities[(lever.name, side)]] for side in ("off", "on"))
            factor = None
            if lever.probe and all(label in probe for label in lever.probe):
                factor = probe[lever.probe[1]] / probe[lever.probe[0]]
            # a shared run's numbers, under this lever's own overrides
            results.append(
                LeverResult(
                    lever,
                    dataclasses.replace(off, overrides=sides[(lever.name, "off")]),
                    dataclasses.replace(on, overrides=sides[(lever.name, "on")]),
                    factor,
                )
            )
            if done is not None:
                done(results)  # partial results survive a time limit that stops a later lever
    return results


def _measure(job: TrainConfig, overrides: list[str]) -> BenchRun:
    from fsdp_kit.train import run  # late: the CLI imports this package for its parser, Hydra not yet needed

    try:
        result = run(job, console=_quiet_console())
    except Exception as err:  # one failing recipe (a CUDA error, a compile failure) must not cost the others
        return BenchRun(overrides, dict.fromkeys(_MEASURED), error=f"{type(err).__name__}: {first_line(err)}")
    numbers = {name: result.summary.get(name) for name in _MEASURED if name != "batch_size"}
    numbers["batch_size"] = result.batch_size  # the batch the search found
    return BenchRun(overrides, numbers, result.batch_search or {})


def _identity(job: TrainConfig) -> str:
    """Two sides that compose to the same config (e.g. every lever's "on" that is the base recipe) run once."""
    return to_yaml(dataclasses.replace(job, run_dir=""))


def _quiet_console() -> Console:
    return Console(file=io.StringIO())  # the bench prints its own lines; the runs' consoles would bury them


def _release() -> None:
    """Free what a run left before the next one measures its largest batch."""
    import torch  # here, not with the module: `fsdp-kit bench` refuses bad options without importing torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.compiler.reset()  # compiled blocks of the previous model


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.3g}"
