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


# -- checkpoints and run dirs (issue #13) -----------------------------------------------------------------------
# Each case prepares the folder, runs the command, and checks the one error line and that nothing changed (the run
# dir checks run in a Hydra callback before Hydra writes .hydra/ and train.log).

def _fake_checkpoint(folder: Path) -> Path:
    """Enough of a checkpoint for the checks that run before any shard is read."""
    folder.mkdir(parents=True)
    (folder / "fsdp_kit.json").write_text("{}")
    (folder / ".metadata").write_bytes(b"")
    return folder


def test_export_onto_a_file_is_refused(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_1")
    (tmp_path / "weights.bin").write_bytes(b"keep me")
    before = snapshot(tmp_path)
    for out, message in (("weights.bin", "weights.bin is a file"), ("weights.bin/hf", "which is a file")):
        assert_rejected(fsdp_kit("export", str(checkpoint), out, cwd=tmp_path),
                        Case(f"export-{out}", [], 2, message))
    assert snapshot(tmp_path) == before


def test_train_into_a_run_dir_whose_checkpoints_is_a_file_is_refused_up_front(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")
    before = snapshot(run_dir)
    outcome = fsdp_kit("train", f"hydra.run.dir={run_dir}", *FAST, cwd=tmp_path)
    assert_rejected(outcome, Case("checkpoints-is-a-file", [], 2, "checkpoints is a file, not a folder"))
    assert snapshot(run_dir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_into_a_read_only_run_dir_is_refused_up_front(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints").chmod(0o555)
    try:
        outcome = fsdp_kit("train", f"hydra.run.dir={run_dir}", *FAST, cwd=tmp_path)
    finally:
        (run_dir / "checkpoints").chmod(0o755)
    assert_rejected(outcome, Case("read-only-checkpoints", [], 2, "is not writable"))


def test_a_second_writer_of_a_run_dir_is_refused(tmp_path):
    import json
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with subprocess.Popen(["sleep", "120"]) as holder:
        try:
            (run_dir / ".fsdp_kit.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
            before = snapshot(run_dir)
            outcome = fsdp_kit("train", f"hydra.run.dir={run_dir}", *FAST, cwd=tmp_path)
        finally:
            holder.kill()
    assert_rejected(outcome, Case("second-writer", [], 2, f"is in use by another run (pid {holder.pid}"))
    assert snapshot(run_dir) == before


def test_resume_from_a_folder_without_its_marker_is_refused(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path / "old" / "checkpoints" / "step_3")
    (checkpoint / "fsdp_kit.json").unlink()
    before = snapshot(tmp_path / "old")
    outcome = fsdp_kit("train", f"hydra.run.dir={tmp_path / 'run'}", f"checkpoint.resume={checkpoint}", *FAST,
                       cwd=tmp_path)
    assert_rejected(outcome, Case("resume-no-marker", [], 2, "fsdp_kit.json is missing"))
    assert snapshot(tmp_path / "old") == before
