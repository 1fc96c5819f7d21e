"""Checkpoints lose nothing: exact resume, resharding, preemption, kill -9 mid-save, HF export, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import Outcome, exit_codes, job, run_cli, run_ranks, signal_after_first_log, train

from fsdp_kit.checkpoint.manager import complete_checkpoints
from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE
from fsdp_kit.errors import CheckpointError, ConfigError
from fsdp_kit.preflight import preflight

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6


def _losses(result, start: int = 1) -> list[float]:
    return [result.losses[s] for s in range(start, STEPS + 1)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """2 ranks, dropout on (RNG matters), a checkpoint every 3 steps."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    cfg = job(run_dir, f"trainer.max_steps={STEPS}", "model.dropout=0.1", "checkpoint.every=3", "checkpoint.keep=5")
    return run_dir, run_ranks(train, 2, cfg)[0]


def test_checkpoints_are_committed_with_a_marker(uninterrupted):
    run_dir, _ = uninterrupted
    found = complete_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in found] == ["step_3", "step_6"]
    marker = json.loads((found[0] / "fsdp_kit.json").read_text())
    assert (marker["step"], marker["world_size"], marker["samples_seen"]) == (3, 2, 3 * 8)
    assert sorted(p.name for p in (found[0] / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert not list((run_dir / "checkpoints").glob("*.partial"))


def test_resume_reproduces_the_uninterrupted_losses_exactly(uninterrupted, tmp_path):
    run_dir, reference = uninterrupted
    cfg = job(tmp_path, f"trainer.max_steps={STEPS}", "model.dropout=0.1",
              f"checkpoint.resume={run_dir / 'checkpoints' / 'step_3'}")
    resumed = run_ranks(train, 2, cfg)[0]
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed.losses[step] - reference.losses[step]) <= 1e-6, (step, resumed.losses, reference.losses)


def test_resume_auto_continues_from_the_newest_complete_checkpoint(tmp_path):
    first = job(tmp_path, f"trainer.max_steps={STEPS}", "checkpoint.every=2")
    reference = run_ranks(train, 2, first)[0]
    shutil.rmtree(tmp_path / "checkpoints" / "step_6")
    (tmp_path / "checkpoints" / "step_8.partial").mkdir()  # an interrupted save is never picked
    resumed = run_ranks(train, 2, first)[0]
    assert sorted(resumed.losses) == [5, 6]
    assert all(abs(resumed.losses[s] - reference.losses[s]) <= 1e-6 for s in (5, 6))


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 1), (1, 2)])
def test_resume_at_a_different_world_size(save_world, load_world, tmp_path):
    """Same global batch (8) at both sizes; dropout off since each rank has its own dropout stream."""
    def cfg(world: int, run_dir: Path, *extra: str):
        return job(run_dir, f"trainer.max_steps={STEPS}", f"trainer.batch_size={8 // world}", "optim=anyprecision",
                   "optim.momentum_dtype=float32", "optim.variance_dtype=float32",
                   "optim.compensation_buffer_dtype=float32", *extra)

    reference = run_ranks(train, save_world, cfg(save_world, tmp_path / "a", "checkpoint.every=3"))[0]
    resumed = run_ranks(train, load_world, cfg(load_world, tmp_path / "b",
                                               f"checkpoint.resume={tmp_path / 'a' / 'checkpoints' / 'step_3'}"))[0]
    assert all(abs(resumed.losses[s] - reference.losses[s]) <= 1e-5 for s in (4, 5, 6)), (resumed.losses,
                                                                                          reference.losses)


def test_keep_last_k_and_async_save(tmp_path):
    run_ranks(train, 2, job(tmp_path, "trainer.max_steps=5", "checkpoint.every=1", "checkpoint.keep=2",
                            "checkpoint.async_save=true"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_4", "step_5"]
    resumed = run_ranks(train, 2, job(tmp_path, "trainer.max_steps=6", "checkpoint.every=1", "checkpoint.keep=2"))
    assert sorted(resumed[0].losses) == [6]


def _preempt_rank1(cfg):
    """Rank body: rank 1 signals itself with SIGTERM once training is under way."""
    import torch.distributed as dist

    from fsdp_kit.train import run

    if int(os.environ["RANK"]) == 1:
        def fire() -> None:
            while not dist.is_initialized() or not (Path(cfg.run_dir) / "metrics.jsonl").exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=fire, daemon=True).start()
    result = run(cfg)
    return result.preempted, max(result.losses) if result.losses else None


def test_sigterm_on_one_rank_makes_all_ranks_save_and_stop(tmp_path):
    cfg = job(tmp_path, "trainer.max_steps=500", "data.num_examples=256")
    outcomes = run_ranks(_preempt_rank1, 2, cfg)
    assert outcomes[0][0] and outcomes[1][0], "both ranks agreed to stop"
    saved = complete_checkpoints(tmp_path / "checkpoints")
    assert len(saved) == 1 and 0 < int(saved[0].name.split("_")[1]) < 500
    marker = json.loads((saved[0] / "fsdp_kit.json").read_text())
    assert marker["reason"] == "preemption"
    assert (tmp_path / "preempted").read_text().strip() == str(marker["step"])


def test_sigusr2_through_the_cli_saves_and_exits_with_the_requeue_code(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fsdp_kit.train", f"hydra.run.dir={tmp_path}",
                             "trainer.max_steps=100000", "trainer.log_every=1", "trainer.eval_every=0",
                             "data.num_examples=256", "data.eval_examples=32"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = signal_after_first_log(proc, tmp_path, signal.SIGUSR2)
    assert proc.returncode == EXIT_REQUEUE, output[-2000:]
    assert len(complete_checkpoints(tmp_path / "checkpoints")) == 1


def _killed_mid_save(run_dir: str) -> None:
    """Rank body (a forked process of its own): train, and SIGKILL itself once the shards of step 4 are written,
    before they are committed."""
    from fsdp_kit.checkpoint import manager
    from fsdp_kit.train import run

    commit = manager.CheckpointManager._commit

    def commit_or_die(self, partial, final, meta):
        if final.name == "step_4":
            os.kill(os.getpid(), signal.SIGKILL)
        commit(self, partial, final, meta)

    manager.CheckpointManager._commit = commit_or_die  # this forked process's own copy of the class
    run(job(run_dir, "trainer.max_steps=6", "checkpoint.every=2"))


def test_kill_9_mid_save_loses_only_the_steps_since_the_last_complete_checkpoint(tmp_path):
    assert exit_codes(_killed_mid_save, 1, str(tmp_path / "run"), timeout=300) == [-signal.SIGKILL]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_2"]
    assert (checkpoints / "step_4.partial").is_dir()
    resumed = run_ranks(train, 1, job(tmp_path / "run", "trainer.max_steps=6", "checkpoint.every=2"))[0]
    reference = run_ranks(train, 1, job(tmp_path / "reference", "trainer.max_steps=6"))[0]
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    assert all(abs(resumed.losses[s] - reference.losses[s]) <= 1e-6 for s in (3, 4, 5, 6))
    # keep=2 saves of the timeline, plus step_2: what this run resumed from is never pruned by that run
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_2", "step_4", "step_6"]


@pytest.fixture()
def saved(tmp_path) -> Path:
    run_ranks(train, 1, job(tmp_path / "run", "trainer.max_steps=2", "checkpoint.at_end=true"))
    return tmp_path / "run" / "checkpoints" / "step_2"


def _resume(tmp_path: Path, checkpoint: Path, *extra: str):
    return run_ranks(train, 1, job(tmp_path / "resume", "trainer.max_steps=3", f"checkpoint.resume={checkpoint}",
                                   *extra))


def test_corrupt_marker_is_named(saved, tmp_path):
    (saved / "fsdp_kit.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"fsdp_kit\.json is corrupt"):
        preflight(job(tmp_path, f"checkpoint.resume={saved}"), world_size=1, device_type="cpu")


def test_missing_dcp_index_is_named(saved, tmp_path):
    (saved / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        preflight(job(tmp_path, f"checkpoint.resume={saved}"), world_size=1, device_type="cpu")


def test_partial_checkpoint_is_refused(saved, tmp_path):
    partial = saved.with_name("step_9.partial")
    shutil.copytree(saved, partial)
    with pytest.raises(CheckpointError, match="incomplete save"):
        preflight(job(tmp_path, f"checkpoint.resume={partial}"), world_size=1, device_type="cpu")


def test_truncated_shard_fails_with_a_clear_error_and_deletes_nothing(saved, tmp_path):
    shard = next(p for p in saved.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    before = sorted(p.name for p in saved.parent.iterdir())
    with pytest.raises(AssertionError, match=r"CheckpointError: .*step_2 is corrupt: __0_0\.distcp"):
        _resume(tmp_path, saved)
    assert sorted(p.name for p in saved.parent.iterdir()) == before


def test_checkpoint_from_a_different_model_shape_is_refused(saved, tmp_path):
    expected = r"saved from a different model .*saved \[384, 128\] vs model \[384, 64\]"
    with pytest.raises(AssertionError, match=expected):
        _resume(tmp_path, saved, "model.hf_config.d_model=64")


def test_resume_never_refuses_to_overwrite_existing_checkpoints(saved, tmp_path):
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        preflight(job(saved.parent.parent, "checkpoint.resume=never"), world_size=1, device_type="cpu")


# -- issue #13: reliability ------------------------------------------------------------------------------------


def _cli_train(run_dir: Path, *overrides: str) -> Outcome:
    """``fsdp-kit train`` through the real entry point, in a forked process."""
    fast = ["data.num_examples=64", "data.eval_examples=16", "trainer.batch_size=4", "trainer.eval_every=0",
            "trainer.eval_generate=false", "metrics.progress=false", "trainer.warmup_steps=1"]
    return run_cli("train", f"hydra.run.dir={run_dir}", *fast, *overrides, cwd=ROOT, timeout=300)


def _all_finite(checkpoint: Path, out: Path) -> bool:
    from safetensors.torch import load_file

    from fsdp_kit.checkpoint.export import export_hf

    export_hf(checkpoint, out)
    return all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())


def test_a_run_that_blows_up_stops_with_an_error_and_keeps_its_finite_checkpoints(tmp_path):
    result = _cli_train(tmp_path / "run", "optim.lr=1e8", "checkpoint.every=1", "checkpoint.keep=2",
                        "trainer.max_steps=30", "trainer.max_nonfinite_steps=3")
    assert result.code == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged: 3 steps in a row" in errors[0] and "Fix:" in errors[0]
    assert "optimizer step was skipped (1 in a row" in result.stdout
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(saved) == 2, saved
    for i, checkpoint in enumerate(saved):
        assert _all_finite(checkpoint, tmp_path / f"hf{i}"), checkpoint


def test_a_retrained_step_replaces_the_old_one_which_is_moved_aside(tmp_path, capfd):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    run_ranks(train, 1, job(run, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5"))
    first = json.loads((checkpoints / "step_4" / "fsdp_kit.json").read_text())["saved_at"]
    time.sleep(1.1)  # a new time stamp for the replaced folder's name and the new save
    run_ranks(train, 1, job(run, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5",
                            f"checkpoint.resume={checkpoints / 'step_2'}"))
    replaced = sorted(checkpoints.glob("step_4.replaced-*"))
    assert len(replaced) == 1 and json.loads((replaced[0] / "fsdp_kit.json").read_text())["saved_at"] == first
    assert json.loads((checkpoints / "step_4" / "fsdp_kit.json").read_text())["saved_at"] != first
    assert "moved the earlier" in capfd.readouterr().out
    # a step folder whose marker was deleted (damaged) is moved aside too instead of failing the save
    (checkpoints / "step_4" / "fsdp_kit.json").unlink()
    run_ranks(train, 1, job(run, "trainer.max_steps=4", "checkpoint.every=2", "checkpoint.keep=5"))
    assert len(sorted(checkpoints.glob("step_4.replaced-*"))) == 2
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_2", "step_4"]


@pytest.fixture()
def two_saved(tmp_path) -> Path:
    """step_1 and step_2 of a 1-rank run; returns the checkpoints folder."""
    run_ranks(train, 1, job(tmp_path / "run", "trainer.max_steps=2", "checkpoint.every=1", "checkpoint.keep=5"))
    return tmp_path / "run" / "checkpoints"


def _as_legacy(checkpoint: Path, checksums: bool = True) -> None:
    """Rewrite ``checkpoint``'s marker as an older fsdp_kit wrote it: no timeline fields, no self-checksum, and
    (``checksums=False``) from before file checksums."""
    from fsdp_kit.checkpoint.marker import LEGACY_KEYS

    marker = checkpoint / "fsdp_kit.json"
    meta = {k: v for k, v in json.loads(marker.read_text()).items()
            if k in LEGACY_KEYS and (checksums or k not in ("checksum", "checksums"))}
    marker.write_text(json.dumps(meta, indent=1))


def _flip(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def test_changed_bytes_in_a_shard_are_named_with_the_newest_checkpoint_that_verifies(two_saved, tmp_path):
    from fsdp_kit.checkpoint.export import export_hf

    marker = json.loads((two_saved / "step_2" / "fsdp_kit.json").read_text())
    assert marker["checksum"] == "crc32" and {"__0_0.distcp", ".metadata"} <= set(marker["checksums"])
    _flip(two_saved / "step_2" / "__0_0.distcp")
    before = sorted(p.name for p in two_saved.iterdir())
    expected = rf"step_2 is corrupt: __0_0\.distcp \(checksum differs\)\. Fix: resume from {two_saved / 'step_1'}"
    with pytest.raises(AssertionError, match=expected):
        run_ranks(train, 1, job(tmp_path / "run", "trainer.max_steps=3"))
    with pytest.raises(CheckpointError, match=expected):
        export_hf(two_saved / "step_2", tmp_path / "hf")
    assert sorted(p.name for p in two_saved.iterdir()) == before


def test_garbage_rng_file_is_one_clear_error(two_saved, tmp_path):
    (two_saved / "step_2" / "rng" / "rank_0.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(AssertionError, match=r"CheckpointError: .*step_2 is corrupt: rng/rank_0\.pt"):
        run_ranks(train, 1, job(tmp_path / "a", "trainer.max_steps=3", f"checkpoint.resume={two_saved / 'step_2'}"))
    # a checkpoint written before checksums were recorded: the load itself names the file
    _as_legacy(two_saved / "step_2", checksums=False)
    with pytest.raises(AssertionError, match=r"CheckpointError: the random-generator state .*rank_0\.pt is unreadable"):
        run_ranks(train, 1, job(tmp_path / "b", "trainer.max_steps=3", f"checkpoint.resume={two_saved / 'step_2'}"))


def test_checksums_are_verified_in_shares_by_two_ranks(tmp_path):
    run_ranks(train, 2, job(tmp_path, "trainer.max_steps=1", "checkpoint.every=1"))
    _flip(tmp_path / "checkpoints" / "step_1" / "__1_0.distcp")
    with pytest.raises(AssertionError, match=r"rank \d: CheckpointError: .*is corrupt: __1_0\.distcp"):
        run_ranks(train, 2, job(tmp_path, "trainer.max_steps=2"))


RUN_ID_AT = textwrap.dedent("""
    import os, sys, time
    os.environ.pop("LOCAL_RANK", None)
    from fsdp_kit.run_dir import run_id
    time.sleep(float(sys.argv[1]) - time.time())
    print(run_id())
""")


def test_two_launches_in_the_same_second_get_different_run_dirs():
    at = str(int(time.time()) + 3 + 0.05)  # both processes resolve the run id in the same second
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")}
    procs = [subprocess.Popen([sys.executable, "-c", RUN_ID_AT, at], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    first, second = (proc.communicate(timeout=60)[0].strip() for proc in procs)
    assert first[:19] == second[:19] and first != second, (first, second)


def test_a_run_dir_held_by_a_live_run_is_refused_and_a_stale_lock_is_not(tmp_path):
    from fsdp_kit.run_dir import LOCK_NAME, STALE_AFTER_S, RunLock

    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run).acquire()
    try:
        child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from fsdp_kit.run_dir import RunLock
            RunLock(__import__("pathlib").Path({str(run)!r})).acquire()""")],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert child.returncode != 0 and "is in use by another run (pid" in child.stderr
    finally:
        lock.release()
    assert not (run / LOCK_NAME).exists()
    lock_file = run / LOCK_NAME
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            lock_file.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": alive.pid}))
            with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {alive.pid}"):
                preflight(job(run, "trainer.max_steps=1"), world_size=1, device_type="cpu")
        finally:
            alive.kill()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_file.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead.pid}))
    preflight(job(run, "trainer.max_steps=1"), world_size=1, device_type="cpu")  # killed run: not blocking
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(ConfigError, match="pid 1 on elsewhere"):
        preflight(job(run, "trainer.max_steps=1"), world_size=1, device_type="cpu")
    old = time.time() - STALE_AFTER_S - 1
    os.utime(lock_file, (old, old))
    preflight(job(run, "trainer.max_steps=1"), world_size=1, device_type="cpu")
    RunLock(run).acquire().release()


def test_async_save_is_committed_before_the_next_save_and_prunes_in_the_background(tmp_path):
    """Rank body checks: a few steps after an async save, its folder is committed without any later save."""
    cfg = job(tmp_path, "trainer.max_steps=6", "checkpoint.every=2", "checkpoint.keep=1", "checkpoint.async_save=true")
    outcome = run_ranks(_commits_seen_during_training, 2, cfg)[0]
    assert outcome[3] == ["step_2"], outcome  # committed by step 3, before step 4's save waited for it
    assert outcome[5] == ["step_4"], outcome  # step_2 pruned off the training path, step_4 committed
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_6"]


def _commits_seen_during_training(cfg):
    import torch.distributed as dist

    import fsdp_kit.training.trainer as trainer_module
    from fsdp_kit.train import run

    seen: dict[int, list[str]] = {}

    def names() -> list[str]:
        return [p.name for p in complete_checkpoints(Path(cfg.run_dir) / "checkpoints")]
    original = trainer_module.Trainer._train_step

    def step(self, micro_batches):
        want = {3: ["step_2"], 5: ["step_4"]}.get(self.state.step)
        if want:  # the step after an async save: no later save has waited for it yet
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and names() != want:
                time.sleep(0.05)
            seen[self.state.step] = names()
        dist.barrier()
        original(self, micro_batches)

    trainer_module.Trainer._train_step = step
    run(cfg)
    return seen


def _settings_after_resume(cfg):
    """Rank body: resume (nothing left to train) and return the loaded optimizer's groups and the lr."""
    import fsdp_kit.training.trainer as trainer_module
    from fsdp_kit.train import run

    captured = {}
    original = trainer_module.Trainer.fit

    def fit(self):
        result = original(self)
        captured["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        captured["last_lr"] = self.schedule.get_last_lr()
        return result

    trainer_module.Trainer.fit = fit
    run(cfg)
    return captured


def test_changed_hyperparameters_on_resume_are_applied_and_logged(saved, tmp_path, capfd):
    changed = ["optim.lr=5e-4", "optim.eps=1e-6", "optim.weight_decay=0.05", "optim.betas=[0.8,0.99]",
               "trainer.lr_schedule=constant"]
    captured = run_ranks(_settings_after_resume, 1, job(saved.parent.parent, "trainer.max_steps=2", *changed))[0]
    group = captured["groups"][0]
    assert (group["lr"], group["eps"], group["weight_decay"], tuple(group["betas"])) == (5e-4, 1e-6, 0.05, (0.8, 0.99))
    assert captured["last_lr"] == [5e-4]  # constant after warmup: the new peak, already at the first resumed step
    out = capfd.readouterr().out
    assert "with changed settings, applied: optim.lr: 0.001 -> 0.0005" in out and "trainer.lr_schedule" in out
    assert "lr: 0.0005" in (saved.parent.parent / "resolved_config.yaml").read_text()  # what ran


@pytest.mark.parametrize(("override", "message"), [
    ("optim=anyprecision", r"saved with optim=adamw, this run uses optim=anyprecision"),
    ("precision=bf16", r"saved with precision=fp32, this run uses precision=bf16"),
])
def test_a_different_optimizer_or_precision_is_named_not_called_damaged(saved, tmp_path, override, message):
    with pytest.raises(CheckpointError, match=message + r".*the checkpoint itself is fine"):
        preflight(job(tmp_path, f"checkpoint.resume={saved}", override), world_size=1, device_type="cpu")
