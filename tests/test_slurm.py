"""Slurm: rendered sbatch files, submitit, Hydra sweeps; checked against a real Slurm started on localhost."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import Outcome, job, run_cli, run_ranks, train
from ports import free_port

from fsdp_kit.errors import ConfigError
from fsdp_kit.launch.sbatch import fill, render
from fsdp_kit.launch.slurm import check, compose_job, timeout_minutes
from fsdp_kit.rehearse.cluster import LocalSlurm
from fsdp_kit.rehearse.faults import FAULT_ENV
from fsdp_kit.rehearse.run import INJECT

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHIPPED = {"slurm/t5_3b.sbatch": "experiment=t5_3b_a100_1node", "slurm/t5_11b.sbatch": "experiment=t5_11b_a100_3nodes"}
# Equal global batch (2 ranks x 4) and no dropout, so a Slurm run and a reference run give the same losses.
TRAIN = ["trainer.batch_size=4", "trainer.eval_every=0", "trainer.eval_generate=false", "trainer.log_every=1",
         "data.num_examples=512", "data.eval_examples=32", "data.pad_to_max_length=true", "data.max_source_len=48",
         "data.max_target_len=8", "metrics.progress=false", "trainer.warmup_steps=1",
         "trainer.lr_schedule=constant"]  # so a shorter run follows the reference exactly


def _fsdp_kit(*args: str, check_rc: bool = True) -> Outcome:
    """``fsdp-kit ARGS`` from the repository root, through the real entry point in a forked process."""
    result = run_cli(*args, cwd=ROOT, timeout=300)
    if check_rc:
        assert result.code == 0, result.stderr[-3000:]
    return result


def _local_overrides(tmp_path: Path, steps: int, procs: int = 2, setup: str = f"export PATH={BIN}:$PATH") -> list[str]:
    return ["cluster=local", f"slurm.procs_per_node={procs}", "slurm.exclusive=false", "slurm.time=00:20:00",
            f"slurm.setup='{setup}'", f"slurm.output_root={tmp_path / 'runs'}",
            f"slurm.log_dir={tmp_path / 'logs'}", f"trainer.max_steps={steps}", *TRAIN]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r and not r.get("summary")}


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run on 2 forked ranks, 40 steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = job(run_dir, *TRAIN, "trainer.max_steps=40", "checkpoint.at_end=false", fast=False)
    return run_ranks(train, 2, cfg)[0].losses


# -- rendering (no Slurm needed) ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(SHIPPED))
def test_shipped_sbatch_files_are_what_the_renderer_makes(path):
    rendered = _fsdp_kit("slurm", "--no-local-checks", "-o", "/dev/stdout", SHIPPED[path]).stdout
    expected = (ROOT / path).read_text().replace(f"-o {path}", "-o /dev/stdout").replace(
        f"sbatch {path}", "sbatch /dev/stdout")
    assert rendered == expected, f"{path} is stale: run `fsdp-kit slurm --no-local-checks -o {path} {SHIPPED[path]}`"


@pytest.mark.parametrize("path", sorted(SHIPPED))
def test_sbatch_files_pass_bash_n_and_shellcheck(path):
    assert subprocess.run(["bash", "-n", str(ROOT / path)]).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(BIN / "shellcheck")
    result = subprocess.run([shellcheck, str(ROOT / path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_efa_environment_only_for_efa_clusters():
    p4d = render(compose_job(["cluster=p4d"]), ["cluster=p4d"])
    local = render(compose_job(["cluster=local"]), ["cluster=local"])
    for line in ("export FI_PROVIDER=efa", "export FI_EFA_USE_HUGE_PAGE=0", "export FI_EFA_SET_CUDA_SYNC_MEMOPS=0"):
        assert line in p4d and line not in local
    assert "FI_EFA_USE_DEVICE_RDMA" not in p4d and "FI_EFA_FORK_SAFE" not in p4d  # obsolete
    assert "#SBATCH --gpus-per-node=8" in p4d and "--gpus-per-node" not in local
    assert "#SBATCH --signal=USR2@90" in p4d and "#SBATCH --requeue" in p4d and "#SBATCH --exclusive" in p4d


def test_override_values_never_run_as_shell(tmp_path):
    """Run the rendered script with stand-ins for srun/scontrol: the override arrives verbatim, nothing runs."""
    marker = tmp_path / "PWNED"
    evil = f"data.source_prefix='$(touch {marker}); `touch {marker}` \"x'"  # Hydra-quoted: a legal value
    overrides = ["cluster=local", f"slurm.output_root={tmp_path / 'runs'}", "slurm.setup='cd .'", evil]
    script = tmp_path / "job.sbatch"
    script.write_text(render(compose_job(overrides), overrides))
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (("srun", f'printf "%s\\n" "$@" > {tmp_path / "argv"}'), ("scontrol", "echo node1")):
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "t",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1"}
    result = subprocess.run(["bash", str(script), "extra=$(touch X)"], env={**env}, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert evil in argv and "extra=$(touch X)" in argv
    assert not marker.exists() and not (tmp_path / "X").exists()


def test_too_many_gpus_per_node_is_rejected():
    with pytest.raises(ConfigError, match=r"asks for more GPUs per node than p4d.24xlarge has \(8\)"):
        check(compose_job(["cluster=p4d", "slurm.procs_per_node=16"]), local_checks=False)


def test_bad_time_limit_is_rejected_and_every_slurm_form_accepted():
    with pytest.raises(ConfigError, match="is not a Slurm time limit"):
        check(compose_job(["slurm.time=4h"]), local_checks=False)
    assert timeout_minutes("1-02:30:00") == 26 * 60 + 30 and timeout_minutes("00:10:01") == 11
    # minutes, days-hours, no limit, minutes:seconds, days-hours:minutes
    assert [timeout_minutes(v) for v in ("90", "2-12", "UNLIMITED", "10:30", "2-12:30")] == [90, 60 * 60, None, 11,
                                                                                           60 * 60 + 30]
    for value in ("90", "2-12", "UNLIMITED"):
        check(compose_job([f"slurm.time={value}"]), local_checks=False)
        assert f"#SBATCH --time={value}" in render(compose_job([f"slurm.time={value}"]), [])


def test_max_restarts_reaches_torchrun_and_a_negative_one_is_refused(tmp_path):
    assert '--max-restarts="$MAX_RESTARTS"' in render(compose_job([]), []) and "MAX_RESTARTS=3 " in render(
        compose_job([]), [])
    result = _fsdp_kit("slurm", "slurm.max_restarts=-1", check_rc=False)
    assert result.code == 2 and "slurm.max_restarts=-1 must be >= 0" in result.stderr, result.stderr


def test_unset_template_variable_is_an_error():
    with pytest.raises(ConfigError, match="template variable\\(s\\) setup have no value"):
        fill("SETUP={{setup}}", {"setup": None})


def test_training_errors_surface_before_rendering(tmp_path):
    result = _fsdp_kit("slurm", "cluster=p4d", "cluster.nodes=3", "sharding=hybrid_shard",
                       "sharding.shard_group_size=5", "trainer.batch_size=4", check_rc=False)
    assert result.code == 2 and "world size 24 is not divisible by sharding.shard_group_size=5" in result.stderr
    result = _fsdp_kit("slurm", "data=csv", "data.path=/nonexistent.csv", check_rc=False)
    assert result.code == 2 and "does not exist" in result.stderr


# -- against a real Slurm (the session's one cluster: the `slurm` fixture in conftest.py) ----------------------
def _sbatch(slurm: LocalSlurm, script: Path, *args: str) -> str:
    result = slurm.run("sbatch", "--parsable", *args, str(script), cwd=ROOT)
    return result.stdout.strip().split(";")[0]


@pytest.mark.slurm
def test_unknown_partition_is_rejected_before_submission(slurm):
    result = _fsdp_kit("slurm", "slurm.partition=gpu-nonexistent", check_rc=False)
    assert result.code == 2
    assert "slurm.partition='gpu-nonexistent' does not exist" in result.stderr and "high, low" in result.stderr


def _wait_for_training(run_dir_glob: Path, timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in run_dir_glob.parent.glob(run_dir_glob.name) if (p / "metrics.jsonl").is_file()]
        if found and len(_losses(found[0])) >= 3:
            return found[0]
        time.sleep(0.2)
    raise TimeoutError(f"no training under {run_dir_glob}")


@pytest.mark.slurm
def test_rendered_sbatch_is_preempted_requeued_resumes_and_matches_the_uninterrupted_run(
        slurm, tmp_path, reference_losses):
    """The whole sbatch path in one job (each Slurm job costs seconds of start-up): render, submit, train on 2
    ranks, get preempted by a higher partition, save, requeue, resume, finish with the reference's losses."""
    script = tmp_path / "job.sbatch"
    _fsdp_kit("slurm", "-o", str(script), "slurm.partition=low", *_local_overrides(tmp_path, 40))
    job_id = _sbatch(slurm, script)
    run_dir = _wait_for_training(tmp_path / "runs" / f"*-{job_id}")
    # A job in the higher-priority partition takes the whole node: Slurm signals, then requeues ours.
    blocker = slurm.run("sbatch", "--parsable", "-p", "high", "--exclusive", "--wrap", "sleep 3",
                        f"--output={tmp_path / 'blocker.out'}").stdout.strip()
    slurm.wait_for(blocker, ("COMPLETED",), timeout=300)
    state = slurm.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=400)
    log = (tmp_path / "logs" / f"fsdp-t5_tiny-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    markers = sorted((run_dir / "checkpoints").iterdir())
    assert markers, "the preempted run saved a checkpoint"
    restarts = [json.loads(p.joinpath("fsdp_kit.json").read_text()) for p in markers]
    assert any(m["reason"] == "preemption" for m in restarts) or "requeueing" in log, log[-4000:]
    assert _records(run_dir)[-1]["world_size"] == 2
    losses = _losses(run_dir)  # every step, before the preemption and after the resume
    assert sorted(losses) == list(range(1, 41))
    assert all(abs(losses[s] - reference_losses[s]) < 1e-5 for s in losses), (losses, reference_losses)


@pytest.fixture(scope="module")
def spread(slurm: LocalSlurm) -> tuple[list[str], list[str]]:
    """Where the submitit jobs run, as ``fsdp-kit submit`` overrides and as Hydra launcher overrides: 2 namespaced
    nodes x 1 task where they exist, else this machine's node x 2 tasks; global batch 12 either way."""
    if slurm.multinode_skip:
        return ["slurm.procs_per_node=2", "trainer.batch_size=6"], ["hydra.launcher.tasks_per_node=2"]
    return (["slurm.partition=nodes", "cluster.nodes=2", "slurm.procs_per_node=1", "trainer.batch_size=6"],
            ["hydra.launcher.partition=nodes", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1"])


@pytest.mark.slurm
def test_fsdp_kit_submit_runs_resumes_after_a_usr2_and_matches(slurm, tmp_path, spread, one_process_losses):
    """submitit across 2 nodes: trains, saves on SIGUSR2, is requeued, resumes; every loss equals one process's."""
    result = _fsdp_kit("submit", *_local_overrides(tmp_path, PREEMPT_STEPS), *spread[0])
    assert "submitted Slurm job" in result.stdout and "logs:" in result.stdout
    job_id = result.stdout.split("submitted Slurm job ")[1].split(":")[0]
    _wait_for_training(tmp_path / "runs" / f"*-{job_id}")
    slurm.run("scancel", "--signal=USR2", job_id)
    state = slurm.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=400)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").rglob("*.out"))
    assert state == "COMPLETED", logs[-4000:]
    run_dir = tmp_path / "runs" / f"fsdp-t5_tiny-{job_id}"
    reasons = [json.loads((p / "fsdp_kit.json").read_text())["reason"] for p in (run_dir / "checkpoints").iterdir()]
    assert "preemption" in reasons, reasons
    _assert_same(_losses(run_dir), one_process_losses, range(1, PREEMPT_STEPS + 1))


@pytest.mark.slurm
def test_hydra_sweep_through_the_slurm_launcher(slurm, tmp_path, spread, one_process_losses):
    """One Slurm job per point, each across 2 nodes: both points give the losses of one process."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "fsdp_kit.train", "-m", "hydra/launcher=slurm", "sharding=full_shard,shard_grad_op",
         f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=15", *spread[1], "trainer.max_steps=3", *TRAIN,
         "trainer.batch_size=6"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for point in (0, 1):
        summary = _records(sweep / str(point))[-1]
        assert summary["summary"] and summary["world_size"] == 2 and summary["final_step"] == 3
        _assert_same(_losses(sweep / str(point)), one_process_losses, range(1, 4))


def test_hydra_sweep_with_the_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "fsdp_kit.train", "-m", "hydra/launcher=local", "wrap=transformer,none",
         f"hydra.sweep.dir={sweep}", "trainer.max_steps=2", *TRAIN], capture_output=True, text=True, cwd=ROOT,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(_records(sweep / str(i))[-1]["final_step"] == 2 for i in (0, 1))


# -- several nodes: namespaced nodes of the same cluster (partition `nodes`), jobs rendered as a user does --------
@pytest.fixture(scope="module")
def nodes(slurm: LocalSlurm) -> LocalSlurm:
    if slurm.multinode_skip:
        pytest.skip(f"no multi-node Slurm here: {slurm.multinode_skip}")
    return slurm


# Global batch 12 whatever the layout (2 nodes x 2 ranks x 3, 3 nodes x 1 rank x 4, 2 nodes x 1 rank x 6): the losses
# of one process.
LAYOUTS = {(2, 2): "trainer.batch_size=3", (3, 1): "trainer.batch_size=4", (2, 1): "trainer.batch_size=6"}
# A constant learning rate: a shorter run follows a longer one. At most 12 steps: from step 16 on, 3 or 4 ranks differ
# from one process by more than 1e-5 on this task in fp32 even uninterrupted (reduction order; measured 1.2e-5 at
# step 16, below 5e-7 before), which once read as a resume error of the `scontrol requeue` job.
FAULT_STEPS, PREEMPT_STEPS = 6, 12
# Fault injection (fsdp_kit/rehearse/faults.py), put on the jobs' PYTHONPATH by slurm.setup.
FAULTS = INJECT


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory) -> dict[int, float]:
    """One process, global batch 12: what every multi-node layout and strategy must reproduce (fp32, 1e-5)."""
    return _uninterrupted(tmp_path_factory, "trainer.batch_size=12", steps=PREEMPT_STEPS)


def _render_for_nodes(tmp_path: Path, name: str, layout: tuple[int, int], steps: int, *overrides: str,
                     fault: str | None = None) -> tuple[Path, dict[str, str] | None]:
    """Render with `fsdp-kit slurm` for ``layout`` (nodes, processes per node) as a user does: the script and the
    environment to submit it with. ``fault``: ``kill|hang:<rank>:<step>`` (fsdp_kit/rehearse/faults.py)."""
    script = tmp_path / f"{name}.sbatch"
    nodes, procs = layout
    setup = f"export PATH={BIN}:$PATH PYTHONPATH={FAULTS}" if fault else f"export PATH={BIN}:$PATH"
    _fsdp_kit("slurm", "-o", str(script), "slurm.partition=nodes", f"cluster.nodes={nodes}", f"slurm.job_name={name}",
              f"slurm.rdzv_port={free_port()}", *_local_overrides(tmp_path, steps, procs, setup), LAYOUTS[layout],
              "trainer.eval_batches=1", *overrides)  # own port: jobs side by side may have the same head node
    return script, {FAULT_ENV: f"{fault}:{tmp_path / f'{name}.fired'}"} if fault else None


def _submit(slurm: LocalSlurm, tmp_path: Path, script: Path, env: dict[str, str] | None) -> tuple[str, Path]:
    """sbatch as a user does; the job id and where its run dir will be. The last node is kept for the job that
    loses its network (the link is the whole node's: other jobs there would lose theirs too)."""
    spare = slurm.nodes[-1]
    where = f"--nodelist={spare}" if script.stem == CUT_OFF else f"--exclude={spare}"
    result = slurm.run("sbatch", "--parsable", where, str(script), cwd=ROOT, env=env)
    job_id = result.stdout.strip().split(";")[0]
    return job_id, tmp_path / "runs" / f"{script.stem}-{job_id}"


def _submit_on_nodes(slurm: LocalSlurm, tmp_path: Path, name: str, layout: tuple[int, int], steps: int,
                     *overrides: str, fault: str | None = None) -> tuple[str, Path]:
    return _submit(slurm, tmp_path, *_render_for_nodes(tmp_path, name, layout, steps, *overrides, fault=fault))


def _finished(slurm: LocalSlurm, tmp_path: Path, job_id: str, name: str, timeout: float = 240) -> str:
    """Wait for the job to end; its log (the assertion message when it did not complete)."""
    state = slurm.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=timeout)
    log = tmp_path / "logs" / f"{name}-{job_id}.out"
    text = log.read_text() if log.is_file() else f"(no log at {log})"
    assert state == "COMPLETED", f"job {job_id} {state}:\n{text[-5000:]}"
    return text


def _assert_same(losses: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(losses) == list(steps), losses
    assert all(abs(losses[s] - want[s]) < 1e-5 for s in steps), (losses, want)


@dataclass
class Batch:
    """The multi-node jobs, all submitted at once (each costs seconds of start-up; side by side they overlap)."""

    tmp_path: Path
    jobs: dict[str, tuple[str, Path]]


def _name(strategy: str, layout: tuple[int, int]) -> str:
    return f"{strategy}-{layout[0]}x{layout[1]}".replace("_", "")


STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard")
# Every (strategy, layout) is one job. Some also break: a rank lost at step 5 (checkpoints every 2 steps), or a
# preemption once training runs; the 3-node hybrid_shard job has T5's real vocabulary (32128 rows, not divisible
# by 3 ranks) and its own reference.
FAULTS_AT = {("full_shard", (2, 2)): "kill:3:5", ("shard_grad_op", (2, 2)): "hang:2:5"}
PREEMPTED = {("hybrid_shard", (3, 1)): ("scancel", "--signal=USR2"), ("shard_grad_op", (3, 1)): ("scontrol", "requeue")}
VOCAB = "model.hf_config.vocab_size=32128"


@pytest.fixture(scope="module")
def batch(nodes: LocalSlurm, tmp_path_factory) -> Batch:
    """Render every job, then submit them all; preempt the PREEMPTED ones once they train (a thread: the tests
    that wait for the other jobs must not delay the signal past the job's end)."""
    tmp_path = tmp_path_factory.mktemp("multinode")
    every = ["checkpoint.every=2", "checkpoint.keep=10"]
    rendered = {}
    for layout in (2, 2), (3, 1):
        for strategy in STRATEGIES:
            fault = FAULTS_AT.get((strategy, layout))
            extra = ["trainer.hang_timeout_s=4", "trainer.hang_factor=4"] if fault and "hang" in fault else []
            if (strategy, layout) == ("hybrid_shard", (3, 1)):
                extra.append(VOCAB)
            steps = PREEMPT_STEPS if (strategy, layout) in PREEMPTED else FAULT_STEPS
            rendered[_name(strategy, layout)] = _render_for_nodes(tmp_path, _name(strategy, layout), layout, steps,
                                                                  f"sharding={strategy}", *every, *extra, fault=fault)
    rendered["stopped"] = _render_for_nodes(tmp_path, "stopped", (2, 1), FAULT_STEPS, *every, "slurm.max_restarts=0",
                                            fault="kill:1:3")
    rendered[CUT_OFF] = _render_for_nodes(tmp_path, CUT_OFF, (2, 2), PREEMPT_STEPS, "sharding=hybrid_shard", *every,
                                          f"dist.timeout_s={CUT_TIMEOUT_S}")
    jobs = {name: _submit(nodes, tmp_path, *args) for name, args in rendered.items()}

    def preempt(job_id: str, run_dir: Path, action: tuple[str, ...]) -> None:
        _wait_for_training(run_dir, timeout=240)
        nodes.run(*action, job_id, check=False)

    def cut_off(run_dir: Path, node: str) -> None:
        _wait_for_training(run_dir, timeout=240)
        nodes.network.set_link(node, up=False)
        try:
            time.sleep(CUT_TIMEOUT_S + 3)
        finally:
            nodes.network.set_link(node, up=True)

    threads = [threading.Thread(target=preempt, args=(*jobs[_name(*key)], action), daemon=True)
               for key, action in PREEMPTED.items()]
    threads.append(threading.Thread(target=cut_off, args=(jobs[CUT_OFF][1], nodes.nodes[-1]), daemon=True))
    for thread in threads:
        thread.start()
    yield Batch(tmp_path, jobs)
    for thread in threads:
        thread.join(timeout=5)


def _uninterrupted(tmp_path_factory, *overrides: str, steps: int = FAULT_STEPS) -> dict[int, float]:
    cfg = job(tmp_path_factory.mktemp("one"), *TRAIN, f"trainer.max_steps={steps}", "checkpoint.at_end=false",
              *overrides, fast=False)
    return run_ranks(train, 1, cfg)[0].losses


@pytest.mark.slurm
def test_two_and_three_nodes_give_the_losses_of_one_process_and_resume_across_node_counts(
        batch, nodes, one_process_losses):
    """2 nodes x 2 ranks and 3 nodes x 1 rank, full_shard / shard_grad_op / hybrid_shard (shard group = one node,
    so the replica all-reduce crosses nodes): the losses of one process on the same global batch (fp32, 1e-5)
    (the preempted jobs are checked below). Then a 3-node job resumes a 2-node job's checkpoint (written by both
    nodes' ranks) with the same losses."""
    _finished(nodes, batch.tmp_path, batch.jobs["hybridshard-2x2"][0], "hybridshard-2x2")
    saved = batch.jobs["hybridshard-2x2"][1] / "checkpoints" / "step_4"
    batch.jobs["resumed-3x1"] = _submit_on_nodes(nodes, batch.tmp_path, "resumed-3x1", (3, 1), FAULT_STEPS,
                                                 f"checkpoint.resume={saved}")  # beside the jobs still running
    for layout in (2, 2), (3, 1):
        for strategy in STRATEGIES:
            if (strategy, layout) in PREEMPTED:
                continue
            job_id, run_dir = batch.jobs[_name(strategy, layout)]
            log = _finished(nodes, batch.tmp_path, job_id, _name(strategy, layout))
            _assert_same(_losses(run_dir), one_process_losses, range(1, FAULT_STEPS + 1))
            assert _records(run_dir)[-1]["world_size"] == layout[0] * layout[1], log[-2000:]
    job_id, run_dir = batch.jobs["resumed-3x1"]
    _finished(nodes, batch.tmp_path, job_id, "resumed-3x1")
    _assert_same(_losses(run_dir), one_process_losses, range(5, FAULT_STEPS + 1))


@pytest.mark.slurm
def test_a_killed_or_hung_rank_costs_a_restart_in_place_and_a_bounded_job_stops_in_one_line(batch, nodes):
    """On 2 nodes x 2 ranks, checkpoints every 2 steps: rank 3 SIGKILLed at step 5, or rank 2 hung at step 5 (its
    watchdog exits 75, its peers' collectives fail): every node restarts its workers, they resume from step 4 and
    end with the uninterrupted losses (checked with the others above). With slurm.max_restarts=0 (2 nodes x 1 rank)
    the kill ends the job with one line per failed rank, naming node, rank, cause and the file with its output; no
    traceback."""
    killed = _finished(nodes, batch.tmp_path, batch.jobs["fullshard-2x2"][0], "fullshard-2x2")
    hung = _finished(nodes, batch.tmp_path, batch.jobs["shardgradop-2x2"][0], "shardgradop-2x2")
    assert re.search(r"fsdp_kit: node \S+: rank 3 \(local 1\) was killed by SIGKILL; restarting the workers of every "
                     r"node from the newest checkpoint \(restart 1 of 3\); its output: \S+/stderr.log", killed), killed
    assert re.search(r"rank 2 \(local 0\) hung: the hang watchdog stopped it \(exit 75; stacks in \S+/rank2.txt\); "
                     r"restarting the workers of every node from the newest checkpoint \(restart 1 of 3\)", hung), hung
    job_id, _ = batch.jobs["stopped"]
    assert nodes.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=240) == "FAILED"
    log = (batch.tmp_path / "logs" / f"stopped-{job_id}.out").read_text()
    assert "rank 1 (local 0) was killed by SIGKILL; no restarts left (slurm.max_restarts=0); stopping" in log, log
    for text in (killed, hung, log):
        assert "Traceback" not in text and "frame #" not in text, text[-4000:]
    assert "killed by SIGTERM" not in killed, killed[-4000:]  # its peers, stopped by torchrun, are no failure


@pytest.mark.slurm
def test_preempted_multi_node_jobs_save_on_every_node_requeue_and_match_the_uninterrupted_run(
        batch, nodes, one_process_losses, tmp_path_factory):
    """SIGUSR2 to a 3-node job with T5's real vocabulary (32128 rows over 3 ranks), and `scontrol requeue` of
    another 3-node job: every rank saves at the same step, the job is requeued and continues in the same run dir
    with the losses of the uninterrupted run."""
    want = {"hybridshard-3x1": _uninterrupted(tmp_path_factory, VOCAB, "trainer.batch_size=12", steps=PREEMPT_STEPS),
            "shardgradop-3x1": one_process_losses}
    for name, losses in want.items():
        job_id, run_dir = batch.jobs[name]
        log = _finished(nodes, batch.tmp_path, job_id, name, timeout=300)
        saves = [json.loads((p / "fsdp_kit.json").read_text()) for p in (run_dir / "checkpoints").iterdir()]
        preempted = [m for m in saves if m["reason"] == "preemption"]
        assert len(preempted) == 1 and preempted[0]["world_size"] == 3, (saves, log[-4000:])
        assert "(requeued 1 time(s))" in log, log[-4000:]
        _assert_same(_losses(run_dir), losses, range(1, PREEMPT_STEPS + 1))


# The 2 x 2 hybrid_shard job (its replica all-reduces cross nodes, on groups of the mesh's own) whose node loses its
# link for longer than its collective timeout, once training runs; it has the cluster's last node to itself.
CUT_OFF, CUT_TIMEOUT_S = "cutoff-2x2", 5


@pytest.mark.slurm
def test_a_node_that_loses_its_network_mid_step_costs_a_restart_in_place(batch, nodes, one_process_losses):
    """The link of one node of a 2 x 2 job down for longer than dist.timeout_s, mid-step: the collectives time out
    on both nodes (also on hybrid sharding's own replica groups), every node restarts its workers in place, they
    resume from the newest complete checkpoint and end with the losses of the uninterrupted run. Each node says so
    in one line (node, ranks, cause, what comes next)."""
    (job_id, run_dir), node = batch.jobs[CUT_OFF], nodes.nodes[-1]
    log = _finished(nodes, batch.tmp_path, job_id, CUT_OFF)
    _assert_same(_losses(run_dir), one_process_losses, range(1, PREEMPT_STEPS + 1))
    timed_out = [line for line in log.splitlines() if "collective timeout" in line]
    said = re.compile(rf"fsdp_kit: node {node}: ranks? [0-3](, [0-3])? \(local [01](, [01])?\) exited 1: "
                      r"collective timeout \(a node or the network stopped answering for dist.timeout_s\); restarting "
                      r"the workers of every node from the newest checkpoint \(restart 1 of 3\); (its|their) output: "
                      r"\S+/stderr.log(, \S+)?$")
    assert any(said.match(line) for line in timed_out), log
    assert len(timed_out) <= 2 and "resuming from" in log, log[-4000:]  # one line per node, at most
    assert "killed by SIGTERM" not in log, log[-4000:]  # the ranks torchrun stopped itself are no failure of their own
    assert "Traceback" not in log and "frame #" not in log, log[-4000:]


@pytest.mark.slurm
def test_rehearse_runs_the_job_scaled_down_through_a_lost_rank_and_a_preemption(nodes, tmp_path):
    """`fsdp-kit rehearse --slurm-conf` on the suite's cluster (its start is the fixture's): the 3-node T5-11B
    experiment on 2 nodes with hybrid sharding, scaled down; a rank killed, the job preempted; every row holds."""
    result = _fsdp_kit("rehearse", "--slurm-conf", str(nodes.conf), "--workdir", str(tmp_path / "rehearsal"),
                       "experiment=t5_11b_a100_3nodes", "cluster.nodes=2", "slurm.procs_per_node=1",
                       "sharding=hybrid_shard", check_rc=False)
    table = result.stdout
    assert result.code == 0, table[-5000:] + result.stderr[-3000:]
    for row in ("job", "rendezvous", "shard groups", "lost rank", "restart", "preemption", "requeue",
                "checkpoint, resume", "step time per node"):
        assert re.search(rf"│ {re.escape(row)} +│ ok +│", table), (row, table)
    assert re.search(r"Replicas \(the same shard, gradients all-reduced\): \[0, 1\] on \S+n1, \S+n2", table), table
