"""A run's history is never rewritten (issue #21): checkpoint timelines, an explicit resume path applied once, a
marker that verifies itself."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import Outcome, job, run_cli, run_ranks, train

from fsdp_kit.checkpoint.manager import complete_checkpoints, read_marker
from fsdp_kit.checkpoint.marker import LEGACY_KEYS
from fsdp_kit.checkpoint.timeline import resume_source
from fsdp_kit.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
FAST_CLI = ["data.num_examples=64", "data.eval_examples=16", "trainer.batch_size=4", "trainer.eval_every=0",
            "trainer.eval_generate=false", "metrics.progress=false", "trainer.warmup_steps=1", "trainer.log_every=1"]


def _cli_train(run_dir: Path, *overrides: str) -> Outcome:
    outcome = run_cli("train", f"hydra.run.dir={run_dir}", *FAST_CLI, *overrides, cwd=ROOT, timeout=300)
    assert outcome.code == 0, outcome.stderr[-3000:]
    return outcome


def _names(checkpoints: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in checkpoints.iterdir())  # abandoned-<time>: without the time


def _trained_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r and not r.get("summary")]


def test_a_resumed_runs_save_survives_keep_1_and_the_left_behind_branch_is_moved_aside(tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    _cli_train(run, "trainer.max_steps=10", "checkpoint.every=2")  # keep=2: step_8, step_10
    out = _cli_train(run, "trainer.max_steps=9", "checkpoint.keep=1", f"checkpoint.resume={checkpoints / 'step_8'}")
    # step_9 is the newest save of the current timeline; step_8 is what that run resumed from
    assert _names(checkpoints) == ["step_10.abandoned", "step_8", "step_9"], _names(checkpoints)
    assert "moved aside the checkpoints of a timeline this run left behind" in out.stdout
    (abandoned,) = checkpoints.glob("step_10.abandoned-*")
    assert read_marker(abandoned)["step"] == 10  # kept whole, by name
    marker = read_marker(checkpoints / "step_9")
    assert marker["parent"] == "step_8" and marker["seq"] > read_marker(abandoned)["seq"]
    (run / "metrics.jsonl").unlink()
    again = _cli_train(run, "trainer.max_steps=10", "checkpoint.keep=1")  # resume=auto
    assert f"resuming from {checkpoints / 'step_9'}: the newest save" in again.stdout
    assert _trained_steps(run) == [10]
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_9", "step_10"]
    assert read_marker(checkpoints / "step_10")["parent"] == "step_9"


def _preempt_at_step(cfg, step: int):
    """Rank body: SIGTERM to itself during ``step`` (the run stops and saves at the next step boundary)."""
    import fsdp_kit.training.trainer as trainer_module
    from fsdp_kit.train import run

    original = trainer_module.Trainer._train_step

    def train_step(self, micro_batches):
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, micro_batches)

    trainer_module.Trainer._train_step = train_step
    return run(cfg).preempted


def test_a_preemption_save_of_a_resumed_run_is_kept_with_the_default_keep(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    run_ranks(train, 1, job(tmp_path, "trainer.max_steps=30", "checkpoint.every=10", "checkpoint.keep=3"))
    cfg = job(tmp_path, "trainer.max_steps=30", "checkpoint.every=10", f"checkpoint.resume={checkpoints / 'step_10'}")
    assert run_ranks(_preempt_at_step, 1, cfg, 12) == [True]
    saved = [p for p in complete_checkpoints(checkpoints) if read_marker(p)["reason"] == "preemption"]
    assert len(saved) == 1 and 12 <= read_marker(saved[0])["step"] < 20, _names(checkpoints)
    assert _names(checkpoints) == sorted(["step_10", saved[0].name, "step_20.abandoned", "step_30.abandoned"])
    found = resume_source("auto", checkpoints)
    assert found is not None and found.path == saved[0]  # not step_30 of the abandoned branch


def test_an_explicit_resume_path_applies_only_on_the_first_start(tmp_path):
    source = tmp_path / "a"
    _cli_train(source, "trainer.max_steps=2")
    command = [f"checkpoint.resume={source / 'checkpoints' / 'step_2'}", "trainer.max_steps=4",
               "checkpoint.every=1"]
    _cli_train(tmp_path / "b", *command)
    checkpoints = tmp_path / "b" / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_3", "step_4"]
    (source / "checkpoints" / "step_2").rename(source / "checkpoints" / "gone")  # a requeue needs only its own saves
    (tmp_path / "b" / "metrics.jsonl").unlink()
    again = _cli_train(tmp_path / "b", *command, "trainer.max_steps=6")  # the same sbatch, requeued (longer run)
    lines = [line for line in again.stdout.splitlines() if line.startswith("resuming from")]
    assert lines == [f"resuming from {checkpoints / 'step_4'}: this run dir's newest save, which continues "
                     f"checkpoint.resume={source / 'checkpoints' / 'step_2'} (an explicit path applies only on the "
                     "run's first start)"], again.stdout
    assert _trained_steps(tmp_path / "b") == [5, 6]
    assert not list(checkpoints.glob("*.replaced-*")) and not list(checkpoints.glob("*.abandoned-*"))


# -- the marker verifies itself --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("saved")
    run_ranks(train, 1, job(run, "trainer.max_steps=2", "checkpoint.every=1", "checkpoint.keep=5"))
    return run / "checkpoints"


def test_every_flipped_bit_of_the_marker_is_refused(saved, tmp_path):
    marker = tmp_path / "step_2"
    marker.mkdir()
    (marker / ".metadata").write_bytes((saved / "step_2" / ".metadata").read_bytes())
    original = (saved / "step_2" / "fsdp_kit.json").read_bytes()
    for at in range(len(original)):
        flipped = bytearray(original)
        flipped[at] ^= 1 << (at % 8)
        (marker / "fsdp_kit.json").write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=r"fsdp_kit\.json is corrupt"):
            read_marker(marker)


def _damage(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1, old
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize(("old", "new"), [(b'"checksums"', b'"checksuls"'), (b'"marker_crc32"', b'"marker_crc22"')],
                         ids=["checksums-key", "self-checksum-key"])
def test_a_flipped_bit_in_a_checksum_key_is_refused_on_resume_and_export(saved, tmp_path, old, new):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    shutil.copytree(saved / "step_2", checkpoint)
    _damage(checkpoint / "fsdp_kit.json", old, new)
    resumed = run_cli("train", f"hydra.run.dir={tmp_path / 'run'}", *FAST_CLI, "trainer.max_steps=3", cwd=ROOT)
    exported = run_cli("export", str(checkpoint), str(tmp_path / "hf"), cwd=ROOT)
    for outcome in (resumed, exported):
        assert outcome.code != 0 and len(outcome.error_lines) == 1, outcome.stderr[-2000:]
        assert "fsdp_kit.json is corrupt" in outcome.error_lines[0] and "Fix:" in outcome.error_lines[0]
    assert not (tmp_path / "hf").exists()


def test_a_marker_naming_a_checksum_method_without_checksums_is_refused_and_an_old_one_loads(saved, tmp_path):
    checkpoint = tmp_path / "step_1"
    shutil.copytree(saved / "step_1", checkpoint)
    meta = {k: v for k, v in json.loads((checkpoint / "fsdp_kit.json").read_text()).items() if k in LEGACY_KEYS}
    (checkpoint / "fsdp_kit.json").write_text(json.dumps({**meta, "checksums": {}}))
    with pytest.raises(CheckpointError, match="names the checksum method 'crc32' but holds no checksums"):
        read_marker(checkpoint)
    (checkpoint / "fsdp_kit.json").write_text(json.dumps(meta))  # as fsdp_kit wrote it before this change
    with pytest.warns(UserWarning, match="written before markers carried their own checksum"):
        assert read_marker(checkpoint)["step"] == 1


# -- a checkpoints/ that cannot be written is refused before training -------------------------------------------


def _dangling(checkpoints: Path, tmp_path: Path) -> None:
    checkpoints.symlink_to(tmp_path / "unmounted" / "checkpoints")


def _loop(checkpoints: Path, tmp_path: Path) -> None:
    (tmp_path / "other").symlink_to(checkpoints)
    checkpoints.symlink_to(tmp_path / "other")


def _read_only(checkpoints: Path, tmp_path: Path) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    checkpoints.symlink_to(target)


@pytest.mark.parametrize(("make", "message"), [
    (_dangling, r"checkpoints is a symlink to .*unmounted/checkpoints, which does not exist"),
    (_loop, r"checkpoints is a symlink loop"),
    pytest.param(_read_only, r"checkpoints is not writable", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes into read-only folders")),
], ids=["dangling", "loop", "read-only"])
def test_a_checkpoints_folder_that_cannot_be_written_is_refused_before_training(tmp_path, make, message):
    run = tmp_path / "run"
    run.mkdir()
    make(run / "checkpoints", tmp_path)
    outcome = run_cli("train", f"hydra.run.dir={run}", *FAST_CLI, "trainer.max_steps=2", cwd=ROOT)
    assert outcome.code == 2 and len(outcome.error_lines) == 1, outcome.stderr[-2000:]
    assert re.search(message, outcome.error_lines[0]) and "Fix:" in outcome.error_lines[0]
    assert not (run / "metrics.jsonl").exists()  # nothing trained
    assert (run / "checkpoints").is_symlink()


# -- a synchronous save that cannot be written: one line, the last checkpoint intact ----------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A 16 MB tmpfs (one t5_tiny checkpoint is 12.6 MB); skipped where this process cannot mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("limit", ["ulimit", "tmpfs"])
def test_a_save_on_a_full_disk_is_one_line_and_the_last_checkpoint_is_intact(tmp_path, limit, request):
    run = tmp_path / "run"
    run.mkdir()
    if limit == "tmpfs":
        (run / "checkpoints").symlink_to(request.getfixturevalue("small_disk"))
    _cli_train(run, "trainer.max_steps=1")
    checkpoints = run / "checkpoints"
    marker = (checkpoints / "step_1" / "fsdp_kit.json").read_bytes()
    # `ulimit -f 4096; fsdp-kit train ...`: the forked command inherits the limit; the shard (12.6 MB) is over it,
    # the logs are not
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit == "ulimit":
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, hard))
    try:
        outcome = run_cli("train", f"hydra.run.dir={run}", *FAST_CLI, "trainer.max_steps=2", cwd=ROOT)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert outcome.code == 2 and len(outcome.error_lines) == 1, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    why = ("a file reached this process's file-size limit (4194304 bytes, ulimit -f)" if limit == "ulimit"
           else "no space left on")
    error = outcome.error_lines[0]
    assert f"saving step 2 failed: {why}" in error and "step 1 is intact" in error and "Fix:" in error, error
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_1"]  # the half-written save removed
    assert (checkpoints / "step_1" / "fsdp_kit.json").read_bytes() == marker


# -- a resume refuses silent changes to what is trained ----------------------------------------------------------


def test_a_resume_that_changes_what_is_trained_is_refused_key_by_key_unless_allowed(tmp_path):
    run = tmp_path / "run"
    _cli_train(run, "trainer.max_steps=2")
    first = (run / "resolved_config.yaml").read_text()
    changed = ["data.seed=1", "trainer.batch_size=8", "model.dropout=0.2", "trainer.max_steps=3"]
    refused = run_cli("train", f"hydra.run.dir={run}", *FAST_CLI, *changed, cwd=ROOT)
    assert refused.code == 2 and len(refused.error_lines) == 1, refused.stderr[-3000:]
    error = refused.error_lines[0]
    for change in ("data.seed: 0 -> 1", "trainer.global_batch: 4 -> 8", "model.dropout: None -> 0.2"):
        assert change in error, error
    assert "checkpoint.allow_changes=true" in error
    assert (run / "resolved_config.yaml").read_text() == first  # refused before anything was written
    allowed = _cli_train(run, *changed, "checkpoint.allow_changes=true")
    logged = [line for line in allowed.stdout.splitlines() if line.startswith("changed on purpose")]
    assert len(logged) == 3 and "data.seed: 0 -> 1" in logged[0], allowed.stdout
    assert (run / "resolved_config.step_2.yaml").read_text() == first  # what steps 1..2 trained with
    assert "seed: 1" in (run / "resolved_config.yaml").read_text()


def test_another_data_file_or_changed_content_is_refused(tmp_path):
    from fsdp_kit.preflight import preflight

    data = tmp_path / "pairs.jsonl"
    rows = [json.dumps({"text": f"digits {i} {i + 1}", "headline": f"{i}"}) for i in range(64)]
    data.write_text("\n".join(rows) + "\n")
    overrides = ["data=jsonl", f"data.path={data}", "data.eval_examples=8", "trainer.max_steps=1",
                 "checkpoint.at_end=true"]
    run_ranks(train, 1, job(tmp_path / "run", *overrides))
    data.write_text("\n".join(rows[::-1]) + "\n")  # same size, other order
    with pytest.raises(CheckpointError, match=r"trained on other settings than this run's: data\.sha256_first_mb: "):
        preflight(job(tmp_path / "run", *overrides, "trainer.max_steps=2"), world_size=1, device_type="cpu")
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(rows[:40]) + "\n")
    with pytest.raises(CheckpointError, match=r"data\.path: .*pairs\.jsonl' -> .*other\.jsonl'; data\.size: "):
        preflight(job(tmp_path / "run", *overrides[:1], f"data.path={other}", *overrides[2:], "trainer.max_steps=2"),
                  world_size=1, device_type="cpu")


def test_checkpoints_from_before_timelines_resume_and_prune_in_step_order(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    run_ranks(train, 1, job(tmp_path, "trainer.max_steps=3", "checkpoint.every=1", "checkpoint.keep=5"))
    for path in complete_checkpoints(checkpoints):  # as an older fsdp_kit wrote them
        meta = {k: v for k, v in json.loads((path / "fsdp_kit.json").read_text()).items() if k in LEGACY_KEYS}
        (path / "fsdp_kit.json").write_text(json.dumps(meta, indent=1))
    result = run_ranks(train, 1, job(tmp_path, "trainer.max_steps=4", "checkpoint.every=1", "checkpoint.keep=1"))[0]
    assert sorted(result.losses) == [4]  # from step_3, the newest in step order
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["step_3", "step_4"]  # resumed from: kept
    assert read_marker(checkpoints / "step_4")["parent"] == "step_3"
