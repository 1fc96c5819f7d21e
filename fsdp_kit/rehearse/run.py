"""``fsdp-kit rehearse``: the user's job, scaled down, on a local N-node Slurm, through one lost rank and one
preemption; then the table of what held (fsdp_kit/rehearse/report.py).

Order: everything that can refuse (the job as ``fsdp-kit slurm`` renders it, the scaled job, this machine, the work
folder) before anything is started or written; then the cluster (or the one --slurm-conf names), the job submitted
with sbatch as a user does, a SIGKILL of the last rank on the last node at step LOST_AT_STEP (fsdp_kit/rehearse/
faults.py), a SIGUSR2 to the job once it trained past PREEMPT_AFTER_STEP, and the wait for it to complete.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fsdp_kit.config import TrainConfig, compose_job
from fsdp_kit.errors import FsdpKitError
from fsdp_kit.launch.sbatch import render
from fsdp_kit.launch.slurm import check, job_name, run_dir
from fsdp_kit.rehearse.cluster import MULTINODE_PARTITION, Allowed, LocalSlurm, SlurmClient, Unavailable, any_free_port
from fsdp_kit.rehearse.faults import FAULT_ENV, fault_spec
from fsdp_kit.rehearse.machine import (
    EDIT_HOSTS_ENV,
    EDIT_HOSTS_FLAG,
    check_can_start,
    check_running_cluster,
    check_workdir,
    may_edit_hosts,
)
from fsdp_kit.rehearse.probe import PROBE_ENV, read_jsonl
from fsdp_kit.rehearse.scale import LOST_AT_STEP, PREEMPT_AFTER_STEP, Machine, Rehearsal, scale_down

INJECT = Path(__file__).resolve().parent / "inject"
"""Put on a job's PYTHONPATH: its sitecustomize loads the fault injection and the probe (each off unless asked)."""
JOB_TIMEOUT_S = 600


class RehearsalError(FsdpKitError):
    """The local cluster could not run the rehearsal."""

    exit_code = 1


@dataclass(frozen=True)
class Options:
    workdir: Path
    """A new folder: the cluster's files, the two sbatch files, the run dir, the logs."""
    slurm_conf: Path | None = None
    """A running local cluster to use instead of starting one."""
    edit_hosts: bool = False
    """The user allows the node names in /etc/hosts (--edit-hosts)."""


@dataclass
class Outcome:
    """What the rehearsal did, for the report."""

    plan: Rehearsal
    job_id: str
    state: str
    run_dir: Path
    log: Path
    probe: Path
    lost_rank: int
    preempted_after: int | None
    cluster_sbatch: Path
    rehearsal_sbatch: Path


def _scaled(job: TrainConfig, overrides: list[str], options: Options) -> tuple[Rehearsal, list[str], TrainConfig]:
    plan = scale_down(job, Machine.here())
    work = options.workdir.resolve()
    local = [
        f"slurm.partition={MULTINODE_PARTITION}",
        "slurm.exclusive=false",
        "slurm.time=00:30:00",
        "slurm.account=null",
        "slurm.cpus_per_task=null",
        f"slurm.rdzv_port={any_free_port()}",
        f"slurm.setup='export PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={INJECT}'",
        f"slurm.output_root={work / 'runs'}",
        f"slurm.log_dir={work / 'logs'}",
    ]
    scaled_overrides = [*overrides, *plan.overrides, *local]
    scaled = compose_job(scaled_overrides)
    check(scaled, local_checks=False)
    return plan, scaled_overrides, scaled


def rehearse(job: TrainConfig, overrides: list[str], options: Options) -> Outcome:
    """Run the rehearsal of ``job`` (composed from ``overrides``); refusals raise ConfigError before any start."""
    check(job, local_checks=False)  # the job as `fsdp-kit slurm --no-local-checks` checks it for the cluster
    cluster_text = render(job, overrides)
    plan, scaled_overrides, scaled = _scaled(job, overrides, options)
    check_workdir(options.workdir)
    client = check_running_cluster(options.slurm_conf, plan.nodes) if options.slurm_conf else None
    if client is None:
        check_can_start(plan.nodes, options.edit_hosts)
    work = options.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cluster_sbatch, rehearsal_sbatch = work / "cluster.sbatch", work / "rehearsal.sbatch"
    cluster_sbatch.write_text(cluster_text)
    rehearsal_sbatch.write_text(render(scaled, scaled_overrides, file_hint=str(rehearsal_sbatch)))
    (work / "logs").mkdir()
    started = None
    if client is None:
        started = LocalSlurm(
            work / "slurm",
            Allowed(
                edit_hosts=may_edit_hosts(options.edit_hosts),
                install=False,
                edit_hosts_how=f"pass {EDIT_HOSTS_FLAG} (or set {EDIT_HOSTS_ENV}=1)",
                install_how="install them",
            ),
            nodes=plan.nodes,
        )
        _say(f"starting a local Slurm of {plan.nodes} namespaced nodes in {started.root}")
        try:
            started.start()
        except Unavailable as why:
            started.stop()
            raise RehearsalError(
                f"the local Slurm did not start: {why}", f"see its logs in {started.root / 'log'}"
            ) from None
        if started.multinode_skip or len(started.nodes) < plan.nodes:
            started.stop()
            raise RehearsalError(
                f"the local Slurm has no {plan.nodes} nodes: {started.multinode_skip}", "see the reason above"
            )
        client = started
    try:
        return _submit_and_break(client, scaled, plan, work, cluster_sbatch, rehearsal_sbatch)
    finally:
        if started is not None:
            started.stop()


def _submit_and_break(
    client: SlurmClient, scaled: TrainConfig, plan: Rehearsal, work: Path, cluster_sbatch: Path, rehearsal_sbatch: Path
) -> Outcome:
    probe = work / "probe"
    probe.mkdir()
    lost_rank = plan.nodes * plan.procs_per_node - 1  # on the last node, never the rendezvous host (unless 1 node)
    env = {FAULT_ENV: fault_spec("kill", lost_rank, LOST_AT_STEP, str(work / "lost-rank.fired")), PROBE_ENV: str(probe)}
    submitted = client.run("sbatch", "--parsable", str(rehearsal_sbatch), env=env)
    job_id = submitted.stdout.strip().split(";")[0]
    where = run_dir(scaled, job_id)
    log = work / "logs" / f"{job_name(scaled)}-{job_id}.out"
    _say(
        f"submitted job {job_id}: {plan.nodes} node(s) x {plan.procs_per_node} process(es); rank {lost_rank} is "
        f"killed at step {LOST_AT_STEP}, the job preempted after step {PREEMPT_AFTER_STEP}; log {log}"
    )
    preempted_after = _preempt_once_past(client, job_id, where, work / "lost-rank.fired")
    state = client.wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=JOB_TIMEOUT_S)
    return Outcome(plan, job_id, state, where, log, probe, lost_rank, preempted_after, cluster_sbatch, rehearsal_sbatch)


def _preempt_once_past(client: SlurmClient, job_id: str, where: Path, fired: Path) -> int | None:
    """SIGUSR2 to every process of the job once it trained past PREEMPT_AFTER_STEP after the lost rank's restart
    (Slurm's notice before a preemption or the time limit); the step it had reached, None where it ended first."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        step = _last_step(where / "metrics.jsonl")
        if fired.exists() and step > PREEMPT_AFTER_STEP:
            client.run("scancel", "--signal=USR2", job_id, check=False)
            return step
        if client.job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
            return None
        time.sleep(0.1)
    return None


def _last_step(metrics: Path) -> int:
    """The highest step metrics.jsonl has a record of (a line being written is skipped)."""
    steps = [record.get("step") or 0 for record in read_jsonl(metrics)]
    return max(steps, default=0)


def _say(line: str) -> None:
    print(f"rehearse: {line}", file=sys.stderr, flush=True)
