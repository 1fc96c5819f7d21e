"""Issue 21 §5 and §6, run as a user types them: one line instead of a traceback, nothing half written, and
start-up lines that tell the truth (export, a Slurm sweep without Slurm, two runs in one run dir, profiling a
resumed run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli
from test_adversarial import FAST, Case, assert_rejected, snapshot


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


# --- export (issue 21 §5) ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_with_a_relative_tokenizer(tmp_path_factory):
    """A run trained from its own folder with `data.tokenizer=tok` (a local tokenizer folder, relative)."""
    from transformers import ByT5Tokenizer

    where = tmp_path_factory.mktemp("trained")
    ByT5Tokenizer().save_pretrained(where / "tok")
    outcome = run_cli("train", "hydra.run.dir=run", "data.tokenizer=tok", "checkpoint.at_end=true", *FAST,
                      cwd=where)
    assert outcome.code == 0, outcome.stderr
    return where, where / "run" / "checkpoints" / "step_2"


def test_export_from_another_folder_finds_a_relative_local_tokenizer(trained_with_a_relative_tokenizer, tmp_path):
    import json

    from transformers import AutoTokenizer

    where, checkpoint = trained_with_a_relative_tokenizer
    assert json.loads((checkpoint / "fsdp_kit.json").read_text())["tokenizer"] == str(where / "tok")
    outcome = run_cli("export", str(checkpoint), "hf", cwd=tmp_path)
    assert outcome.code == 0, outcome.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("abc")["input_ids"] == [100, 101, 102, 1]


def _limit_file_size() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_export_past_the_file_size_limit_is_one_line_and_leaves_nothing(trained_with_a_relative_tokenizer, tmp_path):
    _, checkpoint = trained_with_a_relative_tokenizer
    outcome = run_cli("export", str(checkpoint), "out/hf", cwd=tmp_path, setup=_limit_file_size)
    assert_rejected(outcome, Case("export-file-size-limit", [], 2, "a file would exceed the file-size limit"))
    assert list(tmp_path.iterdir()) == [], "no half folder, no staging folder, no parent made for it"
    retry = run_cli("export", str(checkpoint), "out/hf", cwd=tmp_path)
    assert retry.code == 0 and (tmp_path / "out" / "hf" / "model.safetensors").is_file(), retry.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hf"]


def test_export_with_a_tokenizer_that_cannot_be_loaded_writes_nothing(trained_with_a_relative_tokenizer, tmp_path):
    where, checkpoint = trained_with_a_relative_tokenizer
    (where / "tok").rename(where / "tok.moved")
    try:
        outcome = run_cli("export", str(checkpoint), "hf", cwd=tmp_path)
        assert_rejected(outcome, Case("export-tokenizer-gone", [], 2, f"({str(where / 'tok')!r}) cannot be loaded"))
        assert "--tokenizer" in outcome.error_lines[0] and list(tmp_path.iterdir()) == []
        given = run_cli("export", str(checkpoint), "hf", "--tokenizer", str(where / "tok.moved"), cwd=tmp_path)
        assert given.code == 0 and (tmp_path / "hf" / "tokenizer_config.json").is_file(), given.stderr
    finally:
        (where / "tok.moved").rename(where / "tok")


# --- issue 21 §6: a refused run writes nothing ------------------------------------------------------------------
def test_of_two_runs_started_at_once_into_one_run_dir_the_refused_one_writes_nothing(tmp_path):
    """The second run starts once the first has written its .hydra/ files, which it did before it took the run
    dir's lock (seconds later, after imports and the model): the second then rewrote the first's .hydra/."""
    import threading
    import time

    run_dir = tmp_path / "run"
    first: dict = {}
    winner = threading.Thread(target=lambda: first.update(outcome=run_cli(
        "train", f"hydra.run.dir={run_dir}", *FAST, "trainer.max_steps=3", cwd=tmp_path)))
    winner.start()
    deadline = time.monotonic() + 60
    overrides = run_dir / ".hydra" / "overrides.yaml"  # Hydra's last file: wait until it is complete
    while time.monotonic() < deadline and not (overrides.exists() and "max_steps=3\n" in overrides.read_text()):
        time.sleep(0.01)
    written = {name: (run_dir / ".hydra" / name).read_text() for name in ("config.yaml", "overrides.yaml")}
    second = run_cli("train", f"hydra.run.dir={run_dir}", *FAST, "trainer.max_steps=4", cwd=tmp_path)
    winner.join(180)
    assert first["outcome"].code == 0, first["outcome"].stderr
    assert_rejected(second, Case("second-at-once", [], 2, "is in use by another run"))
    assert {name: (run_dir / ".hydra" / name).read_text() for name in written} == written
    assert "trainer.max_steps=4" not in (run_dir / "train.log").read_text() + written["overrides.yaml"]


def test_a_run_refused_in_a_fresh_run_dir_leaves_no_run_dir(tmp_path):
    outcome = run_cli("train", f"hydra.run.dir={tmp_path / 'run'}", *FAST, "model.pretrained=./no/such/model",
                      cwd=tmp_path)
    assert_rejected(outcome, Case("refused-in-run", [], 2, "the folder does not exist"))
    assert list(tmp_path.iterdir()) == [], "no .hydra/, train.log or lock left in a run dir made for nothing"


def test_profiling_a_resumed_run_with_fewer_steps_left_than_the_window_says_so(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("train", f"hydra.run.dir={run_dir}", *FAST, "checkpoint.at_end=true", cwd=tmp_path).code == 0
    window = ["trainer.profile=true", "trainer.profile_wait=2", "trainer.profile_warmup=1", "trainer.profile_active=1"]
    outcome = run_cli("train", f"hydra.run.dir={run_dir}", *FAST, "trainer.max_steps=4", *window, cwd=tmp_path)
    assert outcome.code == 0, outcome.stderr
    said = [line for line in outcome.stdout.splitlines() if line.startswith("profile:")]
    assert len(said) == 1 and "no trace will be written: this run has 2 step(s) left (resumed at step 2 of 4)" \
        in said[0], outcome.stdout
    assert not (run_dir / "profile").exists()
    fresh = run_cli("train", f"hydra.run.dir={tmp_path / 'fresh'}", *FAST, "trainer.max_steps=4", *window,
                    cwd=tmp_path)
    assert fresh.code == 0 and f"profile: steps 4-4 are traced into {tmp_path / 'fresh' / 'profile'}" in fresh.stdout
    assert [p.name for p in (tmp_path / "fresh" / "profile").iterdir()] == ["trace_rank0_step4.json"]
