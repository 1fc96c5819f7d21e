"""Render a ready-to-submit sbatch file from the same config the job will compose, so the two never disagree.

Every value that comes from the user is quoted with ``shlex.quote``: a Hydra override can never run as shell.
"""

from __future__ import annotations

import re
import shlex
from importlib import resources

from fsdp_kit.config import TrainConfig
from fsdp_kit.errors import ConfigError
from fsdp_kit.launch.slurm import job_name, procs_per_node

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

# EFA/NCCL settings of current AWS practice (libfabric >= 1.18, aws-ofi-nccl >= 1.7, where the old
# FI_EFA_USE_DEVICE_RDMA and FI_EFA_FORK_SAFE are obsolete).
_EFA_ENV = """\
export FI_PROVIDER=efa                     # libfabric: carry inter-node traffic over EFA
export FI_EFA_USE_HUGE_PAGE=0              # huge pages make fork() in DataLoader workers fail with ENOMEM
export FI_EFA_SET_CUDA_SYNC_MEMOPS=0       # aws-ofi-nccl orders CUDA memory itself; skip libfabric's syncs"""
_NCCL_ENV = """\
export NCCL_SOCKET_IFNAME=^docker,lo,veth  # NCCL bootstrap over the host NIC, never docker/loopback/veth"""


def render(job: TrainConfig, overrides: list[str], render_args: str | None = None,
           file_hint: str = "job.sbatch") -> str:
    """The sbatch script for ``job``; ``overrides`` are the Hydra overrides the job runs with."""
    values = {
        "description": f"train {job.model.name} on {job.cluster.nodes} node(s) of {job.cluster.name}",
        "render_args": render_args if render_args is not None else " ".join(map(shlex.quote, overrides)),
        "file_hint": file_hint,
        "directives": "\n".join(f"#SBATCH {d}" for d in directives(job)),
        "setup": shlex.quote(job.slurm.setup),
        "procs_per_node": str(procs_per_node(job)),
        "rdzv_port": str(job.slurm.rdzv_port),
        "output_root": shlex.quote(job.slurm.output_root),
        "overrides": " ".join(map(shlex.quote, overrides)),
        "network_env": _network_env(job),
    }
    template = resources.files("fsdp_kit.launch").joinpath("job.sbatch.in").read_text()
    return fill(template, values)


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{name}}``; a placeholder without a value is an error, never an empty string."""
    missing = sorted({name for name in _PLACEHOLDER.findall(template) if values.get(name) is None})
    if missing:
        raise ConfigError(f"the sbatch template variable(s) {', '.join(missing)} have no value",
                          "set them in the config (see fsdp_kit/launch/sbatch.py)")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def directives(job: TrainConfig) -> list[str]:
    slurm, cluster = job.slurm, job.cluster
    lines = [f"--job-name={job_name(job)}", f"--nodes={cluster.nodes}", "--ntasks-per-node=1"]
    if cluster.gpus_per_node:
        lines.append(f"--gpus-per-node={procs_per_node(job)}")
    if slurm.cpus_per_task:
        lines.append(f"--cpus-per-task={slurm.cpus_per_task}")
    if slurm.exclusive:
        lines.append("--exclusive")
    if slurm.partition:
        lines.append(f"--partition={slurm.partition}")
    if slurm.account:
        lines.append(f"--account={slurm.account}")
    lines += [f"--time={slurm.time}", f"--output={slurm.log_dir}/%x-%j.out", "--open-mode=append",
              f"--signal=USR2@{slurm.signal_before_s}"]
    if slurm.requeue:
        lines.append("--requeue")
    for line in lines:
        if any(c.isspace() or c in "'\"$`\\;" for c in line):
            raise ConfigError(f"the sbatch directive {line!r} contains spaces, quotes or shell characters",
                              "use plain names and values for slurm.* and cluster.* settings")
    return lines


def _network_env(job: TrainConfig) -> str:
    parts = [_EFA_ENV] if job.cluster.efa else []
    parts.append(_NCCL_ENV)
    parts.append("export NCCL_DEBUG=INFO                    # while debugging hangs" if job.slurm.nccl_debug
                 else "# export NCCL_DEBUG=INFO                  # uncomment while debugging hangs")
    return "\n".join(parts)
