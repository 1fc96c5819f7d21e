"""Can this machine rehearse? Each refusal is one line naming the problem and the fix, raised before anything is
started, installed or written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fsdp_kit.errors import ConfigError
from fsdp_kit.rehearse.cluster import (
    APT_INSTALL,
    MULTINODE_PARTITION,
    NEEDED,
    SlurmClient,
    Unavailable,
    refuse_real_slurm,
)
from fsdp_kit.rehearse.network import why_not

EDIT_HOSTS_FLAG = "--edit-hosts"
EDIT_HOSTS_ENV = "FSDP_KIT_EDIT_HOSTS"


def may_edit_hosts(flag: bool) -> bool:
    """The user allowed the node names in /etc/hosts: ``--edit-hosts`` or FSDP_KIT_EDIT_HOSTS=1."""
    return flag or os.environ.get(EDIT_HOSTS_ENV) == "1"


def check_can_start(nodes: int, edit_hosts: bool) -> None:
    """This machine can start a local cluster of ``nodes`` namespaced nodes (not started here)."""
    if os.geteuid() != 0:
        raise ConfigError(
            "fsdp-kit rehearse starts a local Slurm of namespaced nodes, which needs root",
            "run it as root (in a container or VM of your own), or pass --slurm-conf of a running local cluster",
        )
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} not installed (Debian's slurm-wlm and munge)", f"install them: {APT_INSTALL}"
        )
    try:
        refuse_real_slurm()
    except Unavailable as why:
        raise ConfigError(
            f"{why}",
            "rehearse on a machine of your own without Slurm, or pass --slurm-conf of a local rehearsal cluster",
        ) from None
    blocked = why_not(
        may_edit_hosts(edit_hosts),
        f"pass {EDIT_HOSTS_FLAG} (or set {EDIT_HOSTS_ENV}=1) to let rehearse add them, and remove them when it ends",
    )
    if blocked:
        raise ConfigError(
            f"cannot make {nodes} namespaced nodes: {blocked.split('; ')[0]}",
            blocked.split("; ", 1)[1]
            if "; " in blocked
            else "install iproute2 and util-linux (ip, nsenter, unshare) and run as root",
        )


def check_running_cluster(conf: Path, nodes: int) -> SlurmClient:
    """A running local cluster at ``conf`` with at least ``nodes`` nodes in partition ``nodes``."""
    if not conf.is_file():
        raise ConfigError(f"--slurm-conf {conf} does not exist", "pass the slurm.conf of a running local cluster")
    if shutil.which("sinfo") is None:
        raise ConfigError("sinfo not installed (Debian's slurm-wlm)", f"install it: {APT_INSTALL}")
    client = SlurmClient(conf.resolve())
    found = client.nodes_of(MULTINODE_PARTITION)
    if found is None:
        raise ConfigError(
            f"the Slurm controller of --slurm-conf {conf} does not answer",
            "start that cluster, or leave --slurm-conf out to start one",
        )
    if len(found) < nodes:
        raise ConfigError(
            f"--slurm-conf {conf}: partition {MULTINODE_PARTITION!r} has {len(found)} node(s), the job wants {nodes}",
            "pass cluster.nodes=<n> within it, or leave --slurm-conf out",
        )
    return client


def check_workdir(workdir: Path) -> None:
    """A new or empty folder: nothing of an earlier rehearsal is overwritten."""
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ConfigError(
            f"--workdir {workdir} exists and is not empty", "pass a new folder (nothing already there is overwritten)"
        )
