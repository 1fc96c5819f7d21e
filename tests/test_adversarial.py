"""Careless and hostile input, run as a user types it: the exit code, one line naming the problem and the fix,
no traceback, and nothing in the run dir changed. Add a case here for every new one found."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
FAST = ["data.num_examples=64", "data.eval_examples=16", "trainer.batch_size=4", "trainer.max_steps=2",
        "trainer.eval_every=0", "trainer.eval_generate=false", "metrics.progress=false"]


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def fsdp_kit(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> Outcome:
    """Run the installed console script as a user would."""
    result = subprocess.run([str(BIN / "fsdp-kit"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    return Outcome(result.returncode, result.stdout, result.stderr)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes (to prove nothing was written, moved or deleted)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Case:
    """A command a user types, the exit code it must end with and a piece of its one error line."""

    id: str
    args: list[str]
    code: int
    message: str
    env: dict[str, str] = field(default_factory=dict)


def assert_rejected(outcome: Outcome, case: Case) -> None:
    assert outcome.code == case.code, f"{case.id}: exit {outcome.code}\n{outcome.stdout}\n{outcome.stderr}"
    assert "Traceback" not in outcome.stderr, f"{case.id}: traceback\n{outcome.stderr}"
    assert len(outcome.error_lines) == 1, f"{case.id}: want one error line\n{outcome.stderr}"
    line = outcome.error_lines[0]
    assert case.message in line, f"{case.id}: {line!r} does not say {case.message!r}"
    assert "Fix:" in line, f"{case.id}: {line!r} names no fix"


CLI_CASES = [
    Case("unknown-subcommand", ["trian"], 2, "invalid choice: 'trian'"),
    Case("no-subcommand", [], 2, "required: COMMAND"),
    Case("plan-unknown-option", ["plan", "cluster=h100", "precision=bf61"], 2, "precision/bf61"),
    Case("slurm-unknown-key", ["slurm", "--no-local-checks", "trainer.batch_sise=4"], 2, "batch_sise"),
    Case("missing-config-dir", ["plan", "--config-dir", "no/such/dir", "cluster=h100"], 2, "--config-dir"),
    Case("train-bad-enum", ["train", "sharding.strategy=fulll_shard"], 1, "fulll_shard"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[case.id for case in CLI_CASES])
def test_bad_command_lines_are_refused_with_one_line(case, tmp_path):
    run_dir = tmp_path / "run"
    args = case.args + ([f"hydra.run.dir={run_dir}", *FAST] if case.args[:1] == ["train"] else [])
    before = snapshot(tmp_path)
    outcome = fsdp_kit(*args, cwd=tmp_path, env=case.env)
    if case.args[:1] == ["train"]:  # Hydra's own composition errors are its multi-line text, exit 1
        assert outcome.code == case.code and case.message in outcome.stderr and "Traceback" not in outcome.stderr
    else:
        assert_rejected(outcome, case)
    assert snapshot(tmp_path) == before


def test_debug_env_shows_the_cause_with_its_traceback(tmp_path):
    quiet = fsdp_kit("plan", "--config-dir", "no/such/dir", cwd=tmp_path)
    loud = fsdp_kit("plan", "--config-dir", "no/such/dir", cwd=tmp_path, env={"FSDP_KIT_DEBUG": "1"})
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr and loud.error_lines == quiet.error_lines


# --- wt-bench: the batch search, `fsdp-kit bench` and the acceptance command -----------------------------------
BENCH_CASES = [
    Case("train-batch-size-auto", ["train", "trainer.batch_size=auto"], 2, "trainer.auto_batch=true"),
    Case("plan-batch-size-auto", ["plan", "cluster=h100", "trainer.batch_size=auto"], 2, "trainer.auto_batch=true"),
    Case("auto-batch-max-zero", ["plan", "cluster=h100", "trainer.auto_batch_max=0"], 2, "trainer.auto_batch_max=0"),
    Case("bench-unknown-lever", ["bench", "--levers", "bf16,fp8"], 2, "unknown lever 'fp8'"),
    Case("bench-one-step", ["bench", "--steps", "1"], 2, "--steps 1"),
    Case("bench-missing-reference", ["bench", "--reference", "no/such.json"], 2, "--reference no/such.json"),
    Case("bench-bad-override", ["bench", "--levers", "ac", "precision=bf61"], 2, "bf61"),
]


@pytest.mark.parametrize("case", BENCH_CASES, ids=[case.id for case in BENCH_CASES])
def test_bench_and_batch_search_mistakes_are_refused_with_one_line(case, tmp_path):
    args = case.args + ([f"hydra.run.dir={tmp_path / 'run'}", *FAST] if case.args[:1] == ["train"] else [])
    before = snapshot(tmp_path)
    assert_rejected(fsdp_kit(*args, cwd=tmp_path, env=case.env), case)
    assert snapshot(tmp_path) == before


def test_acceptance_command_refuses_an_unknown_argument(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu" / "run.sh"
    result = subprocess.run([str(script), "--fast"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert_rejected(Outcome(result.returncode, result.stdout, result.stderr),
                    Case("run-sh-unknown", ["--fast"], 2, "unknown argument '--fast'"))
    assert snapshot(tmp_path) == {}
