"""Launch contract: sbatch rendering never runs a config value as shell, the bash side of the preemption
contract comes from the Python constants, torchrun keeps the requeue exit code, sweeps are checked up front."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import signal
import stat
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from helpers import free_port, run_cli, signal_after_first_log

from fsdp_kit.checkpoint.manager import complete_checkpoints
from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE, PREEMPTED_MARKER
from fsdp_kit.config import TrainConfig, compose_job
from fsdp_kit.errors import ConfigError
from fsdp_kit.launch import sbatch
from fsdp_kit.launch.sbatch import render
from fsdp_kit.launch.slurm import run_dir

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_to_torchrun_saves_and_exits_with_the_requeue_code(tmp_path):
    """A scheduler's SIGTERM to torchrun: the trainers save and exit 75, the marker is left, and the launcher
    (python -m fsdp_kit.launch.torchrun, plain torchrun underneath) exits 75 too, where plain torchrun exits 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsdp_kit.launch.torchrun", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "fsdp_kit.train", f"hydra.run.dir={tmp_path}", "trainer.max_steps=100000", "trainer.batch_size=4",
         "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_generate=false", "metrics.progress=false",
         "data.num_examples=64", "data.eval_examples=16"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = signal_after_first_log(proc, tmp_path, signal.SIGTERM)
    assert proc.returncode == EXIT_REQUEUE, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    saved = complete_checkpoints(tmp_path / "checkpoints")
    assert len(saved) == 1, output[-3000:]
    meta = json.loads((saved[0] / "fsdp_kit.json").read_text())
    assert meta["reason"] == "preemption"
    assert (tmp_path / PREEMPTED_MARKER).read_text().strip() == str(meta["step"])


# -- sbatch rendering: no config value runs as shell ---------------------------------------------------------
EVIL = ["x\n touch PWNED1", "$(touch PWNED2)", "`touch PWNED3`", "';touch PWNED4;'", "x\r\n#SBATCH --x\ntouch PWNED5"]
BASE = ["cluster=p4d", "slurm.setup='cd .'"]
# slurm.setup is shell by contract (it is eval'd on the nodes); every other value must arrive as data.
SHELL_BY_CONTRACT = {"slurm.setup"}


def _string_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, is a list) for every str, str | None and list[str] field of the config dataclasses."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            found += _string_fields(kind, f"{prefix}{f.name}.")
        elif kind is str or str in typing.get_args(kind):
            found.append((prefix + f.name, False))
        elif any(typing.get_args(arg) == (str,) for arg in typing.get_args(kind)):
            found.append((prefix + f.name, True))
    return found


def _with(job: TrainConfig, key: str, value: object) -> TrainConfig:
    job = copy.deepcopy(job)
    *path, name = key.split(".")
    setattr(functools.reduce(getattr, path, job), name, value)
    return job


def _sbatch_block(text: str) -> list[str]:
    """The lines Slurm reads directives from: up to the first line that is neither a comment nor blank."""
    block = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            break
        block.append(line)
    return [line for line in block if line.startswith("#SBATCH")]


def _stand_ins(folder: Path) -> Path:
    """srun and scontrol that record their arguments (NUL-separated) instead of running anything."""
    fake = folder / "bin"
    fake.mkdir()
    (folder / "logs").mkdir()
    for name, body in (("srun", 'printf "%s\\0" "$@" > "$LOGS/srun"; exit "${SRUN_EXIT:-0}"'),
                       ("scontrol", 'printf "%s\\0" "$@" >> "$LOGS/scontrol"; echo node1')):
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(stat.S_IRWXU)
    return fake


def _run_script(script: Path, cwd: Path, fake: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "LOGS": str(fake.parent / "logs"), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NAME": "fsdp-t5_tiny", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1", **env}
    return subprocess.run(["bash", str(script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def p4d_job() -> TrainConfig:
    return compose_job(BASE)


@pytest.mark.parametrize(("key", "is_list"), _string_fields(), ids=[k for k, _ in _string_fields()])
def test_no_config_string_runs_as_shell_or_ends_the_sbatch_block(key, is_list, p4d_job, tmp_path):
    clean = _sbatch_block(render(p4d_job, BASE))
    fake = _stand_ins(tmp_path)
    for n, evil in enumerate(EVIL):
        overrides = [*BASE, f"{key}={evil}"]
        try:
            text = render(_with(p4d_job, key, [evil] if is_list else evil), overrides,
                          render_args=["-o", evil, *overrides], file_hint=evil)
        except ConfigError as err:  # a value written unquoted (#SBATCH) is refused, in one line
            assert "\n" not in str(err)
            assert key in ("model.name", "cluster.name") or key.startswith("slurm."), (key, str(err))
            continue
        script = tmp_path / f"job{n}.sbatch"
        script.write_text(text)
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, text
        block = _sbatch_block(text)
        assert len(block) == len(clean) and all(a.split("=")[0] == b.split("=")[0] for a, b in zip(block, clean)), text
        if key in SHELL_BY_CONTRACT:
            continue
        work = tmp_path / f"cwd{n}"
        work.mkdir()
        result = _run_script(script, work, fake)
        assert result.returncode == 0, (key, evil, result.stderr)
        assert not [p.name for p in work.iterdir() if p.name.startswith("PWNED")], (key, evil)
        argv = (tmp_path / "logs" / "srun").read_bytes().decode().split("\0")  # bytes: keep \r as it is
        assert f"{key}={evil}" in argv, (key, evil, argv)  # the override reaches the trainers verbatim


def test_submit_refuses_a_control_character_before_submitting(monkeypatch):
    from fsdp_kit.launch.submit import submit

    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch: a refusal must come before any submission
    with pytest.raises(ConfigError, match="control character"):
        submit(["slurm.job_name='x\n touch PWNED'"])


# -- the preemption contract: the bash side is rendered from the Python constants ---------------------------
def test_sbatch_requeues_on_the_marker_or_exit_code_in_the_run_dir_python_names(tmp_path):
    overrides = ["cluster=local", f"slurm.output_root={tmp_path / 'runs'}", "slurm.setup='cd .'"]
    job = compose_job(overrides)
    script = tmp_path / "job.sbatch"
    script.write_text(render(job, overrides))
    fake = _stand_ins(tmp_path)
    expected_dir = run_dir(job, "7")  # what fsdp-kit submit and the CLI message use
    logs = tmp_path / "logs"
    # Trainers that saved: marker left by rank 0 (torchrun itself exits 1); or no marker but exit EXIT_REQUEUE.
    for marker, srun_exit, requeued, script_exit in ((True, 1, True, 0), (False, EXIT_REQUEUE, True, 0),
                                                     (False, 3, False, 3)):
        (logs / "scontrol").unlink(missing_ok=True)
        (expected_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        if marker:
            expected_dir.mkdir(parents=True, exist_ok=True)
            (expected_dir / PREEMPTED_MARKER).write_text("3\n")
        result = _run_script(script, tmp_path, fake, SRUN_EXIT=str(srun_exit))
        assert result.returncode == script_exit, result.stderr
        assert f"hydra.run.dir={expected_dir}" in (logs / "srun").read_text().split("\0")
        assert ("requeue\x007\x00" in (logs / "scontrol").read_text()) == requeued
    # Nothing of the contract is spelled in the template: change the constants and the file follows.
    template = re.sub(r"\{\{\w+\}\}", "", (ROOT / "fsdp_kit/launch/job.sbatch.in").read_text())
    assert str(EXIT_REQUEUE) not in template and PREEMPTED_MARKER not in template and "SLURM_JOB_NAME-" not in template
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sbatch, "EXIT_REQUEUE", 76)
        patch.setattr(sbatch, "PREEMPTED_MARKER", "stopped")
        patch.setattr(sbatch, "RUN_DIR_NAME", "run-{job_id}")
        text = render(job, overrides)
    assert '$status -eq 76' in text and 'marker="$RUN_DIR"/stopped' in text
    assert 'RUN_DIR="$OUTPUT_ROOT"/run-"$SLURM_JOB_ID"' in text


# -- sweeps: every point is checked before any is launched ---------------------------------------------------
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=local"], ["hydra/launcher=slurm"]],
                         ids=["basic", "submitit_local", "submitit_slurm"])
def test_a_bad_sweep_point_stops_the_sweep_before_anything_runs(launcher, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", *launcher, "trainer.batch_size=4,0", "wrap=transformer,none",
                     f"hydra.sweep.dir={sweep}", "trainer.max_steps=1", "data.num_examples=64", "data.eval_examples=16",
                     cwd=ROOT, timeout=300)
    assert result.code == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sweep point 2 of 4 (trainer.batch_size=0 wrap=transformer" in errors[0], result.stderr
    assert "trainer.batch_size=0 must be > 0" in errors[0]
    assert not sweep.exists(), "nothing was launched"


def test_a_control_character_in_the_slurm_launcher_settings_stops_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition='a\nb'", "wrap=transformer,none",
                     f"hydra.sweep.dir={sweep}", "data.num_examples=64", "data.eval_examples=16", cwd=ROOT, timeout=300)
    assert result.code == 2, result.stderr[-3000:]
    assert "hydra.launcher.partition 'a\\nb' contains a control character" in result.stderr
    assert not sweep.exists()


def test_torchrun_wrapper_requeues_when_one_trainer_asks_and_the_rest_are_torn_down():
    from fsdp_kit.launch.torchrun import asks_for_requeue, torn_down

    # the workers torchrun stopped itself (SIGTERM) after one failed get no line of their own
    assert torn_down([1, -15]) == [False, True] and torn_down([-9, -15, -15]) == [False, True, True]
    assert torn_down([-15, -15]) == [False, False] and torn_down([75, 1]) == [False, False]

    assert asks_for_requeue([75, 75])
    assert asks_for_requeue([75, -15])  # the watchdog fired on one rank; torchrun stopped the other
    assert asks_for_requeue([75, 1])  # the hung rank exited 75 first, its peer's collective then failed: exit 1
    assert not asks_for_requeue([1, -15])
    assert not asks_for_requeue([-15, -15])


def test_sbatch_requeues_at_most_max_requeues_and_never_with_requeue_false(tmp_path):
    """Exit 75 (a preemption save or a hang) requeues the job, counted by Slurm's SLURM_RESTART_COUNT: a hang that
    recurs at the same step stops after slurm.max_requeues; slurm.requeue=false ends the job after the save."""
    fake = _stand_ins(tmp_path)
    cases = (([], "0", True, "requeueing job 7 (requeue 1 of 2)"),
             ([], "2", False, "stop: checkpoint saved at step ?, but job 7 was requeued 2 time(s) already "
                            "(slurm.max_requeues=2)"),
             (["slurm.requeue=false"], "0", False, "not requeueing (slurm.requeue=false)"))
    for n, (extra, restarts, requeued, line) in enumerate(cases):
        overrides = ["cluster=local", f"slurm.output_root={tmp_path / 'runs'}", "slurm.setup='cd .'",
                     "slurm.max_requeues=2", "slurm.max_restarts=5", *extra]
        text = render(compose_job(overrides), overrides)
        assert ("#SBATCH --requeue" in text) == (not extra)
        script = tmp_path / f"job{n}.sbatch"
        script.write_text(text)
        (tmp_path / "logs" / "scontrol").unlink(missing_ok=True)
        result = _run_script(script, tmp_path, fake, SRUN_EXIT=str(EXIT_REQUEUE), SLURM_RESTART_COUNT=restarts)
        assert line in result.stdout, result.stdout
        assert result.returncode == (0 if requeued else EXIT_REQUEUE), result.stdout
        assert ("requeue\x007\x00" in (tmp_path / "logs" / "scontrol").read_text()) == requeued
        assert "--max-restarts=5" in (tmp_path / "logs" / "srun").read_text().split("\0")


def _timed_out_groups(cfg) -> list[str]:
    """On 4 ranks (2 x 2 hybrid): ranks 2 and 3 stay out of one collective on each group (hybrid sharding's
    replica group, the preemption flag's, the checkpoint's, the default group); rank 0 says which of them gave up
    after dist.timeout_s (not when the others left)."""
    import time

    import torch
    import torch.distributed as dist

    from fsdp_kit import distributed
    from fsdp_kit.checkpoint.manager import CheckpointManager, RunIdentity

    failed = []
    with distributed.session(distributed.detect(), cfg.dist, cfg.sharding) as env:
        manager = CheckpointManager(cfg.checkpoint, cfg.run_dir, env.rank, env.world_size,
                                    RunIdentity("m", {}, "t", {}), timeout_s=cfg.dist.timeout_s)
        groups = {"replica": env.mesh.get_group("replicate"), "preemption": manager.flag._group,
                  "checkpoint": manager._cpu_group(), "default": dist.group.WORLD}  # formed with a longer timeout
        for name, group in groups.items():
            if env.rank < 2:
                started = time.monotonic()
                try:
                    dist.all_reduce(torch.ones(1), group=group)
                except RuntimeError:
                    failed.append(f"{name} {time.monotonic() - started < cfg.dist.timeout_s + 1.5}")
        if env.rank >= 2:
            time.sleep(4 * cfg.dist.timeout_s + 3)  # longer than rank 0's three timeouts
        return failed


def test_dist_timeout_s_bounds_every_group_of_the_job(tmp_path):
    """dist.timeout_s reaches the groups torch makes with its own 30-minute default: a collective whose peer or
    network stopped answering fails after dist.timeout_s there too (then torchrun restarts the workers)."""
    from helpers import job, run_ranks

    cfg = job(tmp_path, "sharding=hybrid_shard", "sharding.shard_group_size=2", "dist.timeout_s=1")
    assert run_ranks(_timed_out_groups, 4, cfg, timeout=60)[0] == ["replica True", "preemption True",
                                                                    "checkpoint True", "default True"]
