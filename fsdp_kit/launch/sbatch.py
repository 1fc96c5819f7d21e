"""Render a ready-to-submit sbatch file from the same config the job will compose, so the two never disagree.

Every value that comes from the user is a quoted shell word, an escaped comment or a checked plain directive
(fsdp_kit.launch.shell): a Hydra override can never run as shell or end the ``#SBATCH`` block early. The run dir,
the ``preempted`` marker and the requeue exit code are rendered from the Python constants the trainer uses.
"""

from __future__ import annotations

import re
import string
from importlib import resources

from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE, PREEMPTED_MARKER
from fsdp_kit.config import TrainConfig
from fsdp_kit.env_values import refuse_in, shell_text, written
from fsdp_kit.errors import ConfigError
from fsdp_kit.launch.shell import check_plain, comment_text, shell_command, shell_word
from fsdp_kit.launch.slurm import RUN_DIR_NAME, TORCHRUN_LOGS, job_name, procs_per_node

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

# EFA/NCCL settings of current AWS practice (libfabric >= 1.18, aws-ofi-nccl >= 1.7, where the old
# FI_EFA_USE_DEVICE_RDMA and FI_EFA_FORK_SAFE are obsolete).
_EFA_ENV = """\
export FI_PROVIDER=efa                     # libfabric: carry inter-node traffic over EFA
export FI_EFA_USE_HUGE_PAGE=0              # huge pages make fork() in DataLoader workers fail with ENOMEM
export FI_EFA_SET_CUDA_SYNC_MEMOPS=0       # aws-ofi-nccl orders CUDA memory itself; skip libfabric's syncs"""
_NCCL_ENV = """\
export NCCL_SOCKET_IFNAME=^docker,lo,veth  # NCCL bootstrap over the host NIC, never docker/loopback/veth"""


def render(
    job: TrainConfig, overrides: list[str], render_args: list[str] | None = None, file_hint: str = "job.sbatch"
) -> str:
    """The sbatch script for ``job``; ``overrides`` are the Hydra overrides the job runs with, ``render_args``
    the ``fsdp-kit slurm`` arguments that made it (default: the overrides)."""
    values = {
        "description": comment_text(
            f"train {written(job.model.name)} on {job.cluster.nodes} node(s) of {written(job.cluster.name)}"
        ),
        "render_args": shell_command(render_args if render_args is not None else overrides),
        "file_hint": shell_word(file_hint),
        "directives": "\n".join(f"#SBATCH {d}" for d in directives(job)),
        # eval'd on the node: ${oc.env:NAME} becomes "${NAME}" there, never the value (fsdp_kit/env_values.py)
        "setup": shell_word(shell_text(job.slurm.setup, "slurm.setup")),
        "procs_per_node": str(procs_per_node(job)),
        "rdzv_port": str(job.slurm.rdzv_port),
        "shutdown_timeout": str(job.slurm.signal_before_s),
        "output_root": _assigned(job.slurm.output_root, "slurm.output_root"),
        "overrides": shell_command(overrides),
        "run_dir_name": _shell_pattern(RUN_DIR_NAME, job_name="SLURM_JOB_NAME", job_id="SLURM_JOB_ID"),
        "preempted_marker": shell_word(PREEMPTED_MARKER),
        "exit_requeue": str(EXIT_REQUEUE),
        "max_restarts": str(job.slurm.max_restarts),
        "requeue": "1" if job.slurm.requeue else "0",
        "max_requeues": str(job.slurm.max_requeues),
        "torchrun_logs": shell_word(TORCHRUN_LOGS),
        "network_env": _network_env(job),
    }
    template = resources.files("fsdp_kit.launch").joinpath("job.sbatch.in").read_text()
    return fill(template, values)


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{name}}``; a placeholder without a value is an error, never an empty string."""
    missing = sorted({name for name in _PLACEHOLDER.findall(template) if values.get(name) is None})
    if missing:
        raise ConfigError(
            f"the sbatch template variable(s) {', '.join(missing)} have no value",
            "set them in the config (see fsdp_kit/launch/sbatch.py)",
        )
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
    lines += [
        f"--time={slurm.time}",
        f"--output={slurm.log_dir}/%x-%j.out",
        "--open-mode=append",
        f"--signal=USR2@{slurm.signal_before_s}",
    ]
    if slurm.requeue:
        lines.append("--requeue")
    for key in ("job_name", "partition", "account", "time", "log_dir"):
        refuse_in(getattr(slurm, key), f"slurm.{key}", "an #SBATCH line")
    for line in lines:
        check_plain(line, "the sbatch directive")
        if any(c.isspace() or c in "'\"$`\\;" for c in line):
            raise ConfigError(
                f"the sbatch directive {line!r} contains spaces, quotes or shell characters",
                "use plain names and values for slurm.* and cluster.* settings",
            )
    return lines


def _assigned(value: str, key: str) -> str:
    """``value`` for a shell assignment: one word, with the environment references of a setting that reads the
    environment expanded on the node (``"${NAME}"``)."""
    text = shell_text(value, key)
    if text is value:
        return shell_word(value)
    parts = re.split(r'("\$\{\w+(?:-[^}]*)?\}")', text)
    return "".join(part if index % 2 else shell_word(part) for index, part in enumerate(parts) if part)


def _shell_pattern(pattern: str, **variables: str) -> str:
    """A ``str.format`` pattern as a shell word: its fields become the given shell variables, its text quoted."""
    parts = []
    for text, field_name, _, _ in string.Formatter().parse(pattern):
        if text:
            parts.append(shell_word(text))
        if field_name is not None:
            parts.append(f'"${variables[field_name]}"')
    return "".join(parts)


def _network_env(job: TrainConfig) -> str:
    parts = [_EFA_ENV] if job.cluster.efa else []
    parts.append(_NCCL_ENV)
    parts.append(
        "export NCCL_DEBUG=INFO                    # while debugging hangs"
        if job.slurm.nccl_debug
        else "# export NCCL_DEBUG=INFO                  # uncomment while debugging hangs"
    )
    return "\n".join(parts)
