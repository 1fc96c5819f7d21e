"""Issue 21 §5 and §6, run as a user types them: one line instead of a traceback, nothing half written, and
start-up lines that tell the truth (export, a Slurm sweep without Slurm, two runs in one run dir, profiling a
resumed run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli
from test_adversarial import Case, assert_rejected, snapshot


def _fake_slurm(folder: Path, tools: tuple[str, ...]) -> dict[str, str]:
    """A PATH whose Slurm client cannot reach a controller (each tool fails as a real one does): nothing else."""
    folder.mkdir()
    for tool in tools:
        script = folder / tool
        script.write_text(f"#!/bin/sh\necho '{tool}: error: fetch_config: DNS SRV lookup failed' >&2\n"
                          f"echo '{tool}: fatal: Could not establish a configuration source' >&2\nexit 1\n")
        script.chmod(0o755)
    return {"PATH": str(folder)}


@pytest.mark.parametrize(("tools", "message"), [
    (("sbatch", "srun", "sinfo"), "Slurm is not reachable from this machine: sinfo failed (sinfo: fatal: Could not"),
    (("sbatch",), "srun and sinfo are not on PATH: Slurm is not reachable"),
    ((), "sbatch and srun and sinfo are not on PATH"),
], ids=["controller-unreachable", "half-a-client", "no-client"])
def test_a_slurm_sweep_where_no_slurm_answers_is_one_line(tools, message, tmp_path):
    env = _fake_slurm(tmp_path / "bin", tools)
    before = snapshot(tmp_path)
    outcome = run_cli("train", "-m", "hydra/launcher=slurm", "optim.lr=1e-3,3e-4",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, env=env)
    assert_rejected(outcome, Case("sweep-without-slurm", [], 2, message))
    assert "hydra/launcher=local" in outcome.error_lines[0] and "Nothing was launched" in outcome.error_lines[0]
    assert outcome.stderr.count("\n") == 1, outcome.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "sweep").exists(), "no sweep dir, no .submitit"
