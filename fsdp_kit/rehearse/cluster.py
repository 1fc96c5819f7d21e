"""A real, private Slurm cluster on localhost (Debian's slurm-wlm + munge): the tests' cluster and the one
``fsdp-kit rehearse`` runs a job on.

One node is this machine (partitions ``low`` and ``high``). Where it can (root, ``ip netns``, leave to edit
/etc/hosts: ``Allowed``), N more nodes join in partition ``nodes``: one network namespace per node on a private bridge
(10.213.K.0/24, an address range only this bridge holds: no traffic leaves the machine), each with its own UTS
hostname and its own slurmd, all sharing the filesystem as a cluster's nodes share a home. Where it cannot, the
one-node tests still run and the multi-node ones skip with ``multinode_skip``.

It never touches a real installation: its own config folder (clients find it through SLURM_CONF), its own
state and spool folders and ports, never a write to /etc/slurm. It skips, saying why, where a Slurm already
runs or where it cannot be installed. It stops only the daemons it started, by pid, and removes exactly the
namespaces, links and hosts lines it made.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsdp_kit.rehearse.network import NodeNetwork, NoNetwork, add_hosts_lines, remove_hosts_lines, why_not

NEEDED = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "munged")
# Where a real installation keeps its config (Debian's current and older layout, the upstream default).
REAL_CONFIGS = (Path("/etc/slurm/slurm.conf"), Path("/etc/slurm-llnl/slurm.conf"), Path("/usr/local/etc/slurm.conf"))


APT_INSTALL = "apt-get install -y --no-install-recommends slurm-wlm munge"


class Unavailable(Exception):
    """The cluster cannot run here; the message says why (the tests skip with it, rehearse refuses with it)."""


@dataclass(frozen=True)
class Allowed:
    """What the cluster may change on this machine beyond its own folder, and how its user allows it (the refusal
    says so)."""

    edit_hosts: bool
    """Add this machine's and the nodes' names to /etc/hosts where they do not resolve (removed again at stop)."""
    install: bool
    """``apt-get install`` slurm-wlm and munge where they are missing."""
    edit_hosts_how: str
    """How the user allows ``edit_hosts``, e.g. "pass --edit-hosts"."""
    install_how: str
    """How the user allows ``install`` (or installs them)."""

    @classmethod
    def for_tests(cls) -> Allowed:
        """The test suite's rules: on CI (CI=true, as root) both; elsewhere only when asked through the environment."""
        ci = os.environ.get("CI") == "true"
        return cls(
            edit_hosts=ci or os.environ.get("FSDP_KIT_EDIT_HOSTS") == "1",
            install=os.geteuid() == 0 and (ci or os.environ.get("FSDP_KIT_INSTALL_SLURM") == "1"),
            edit_hosts_how="run with CI=true or FSDP_KIT_EDIT_HOSTS=1 to let the tests add (and remove) them",
            install_how="run as root with CI=true or FSDP_KIT_INSTALL_SLURM=1 to let the tests install them",
        )


def any_free_port() -> int:
    """A TCP port nothing listens on now, as the kernel picks one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    """Alive and not a zombie (daemons we started leave zombies until reaped; kill -0 cannot tell)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def pid_of(name: str) -> list[int]:
    """Live processes named ``name`` (read from /proc: pgrep may be missing where Slurm is)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name and _alive(int(comm.parent.name)):
                pids.append(int(comm.parent.name))
        except OSError:
            continue  # exited while we looked
    return pids


def refuse_real_slurm() -> None:
    """Raise Unavailable where this machine belongs to a real Slurm: the local cluster never runs beside one."""
    running = [name for name in ("slurmctld", "slurmd", "slurmdbd") if pid_of(name)]
    if running:
        raise Unavailable(
            f"a Slurm is already running here ({', '.join(running)}); "
            "the local cluster never touches a real installation"
        )
    if os.environ.get("SLURM_JOB_ID"):
        raise Unavailable(
            f"running inside Slurm job {os.environ['SLURM_JOB_ID']} of a real cluster; "
            "the local cluster never starts a second Slurm on its nodes"
        )
    configured = [str(path) for path in REAL_CONFIGS if path.exists()]
    if os.environ.get("SLURM_CONF"):
        configured.insert(0, f"SLURM_CONF={os.environ['SLURM_CONF']}")
    if configured:
        raise Unavailable(
            f"this machine is set up for a real Slurm ({', '.join(configured)}); "
            "the local cluster never touches a real installation"
        )


MULTINODE_PARTITION = "nodes"


class SlurmClient:
    """Slurm's client commands against the cluster of one slurm.conf (this process's SLURM_CONF is left alone)."""

    def __init__(self, conf: Path) -> None:
        self.conf = conf

    def run(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster; ``env`` adds to this process's environment."""
        return subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            check=check,
            env={**os.environ, **(env or {}), "SLURM_CONF": str(self.conf)},
            **kwargs,
        )

    def job_state(self, job_id: str) -> str:
        result = self.run("scontrol", "show", "job", job_id, check=False)
        for field in result.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "GONE"

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout}s (wanted {states})")

    def nodes_of(self, partition: str) -> list[str] | None:
        """The nodes of ``partition``; None where the controller does not answer."""
        result = self.run("sinfo", "-h", "-N", "-p", partition, "-o", "%N", check=False, timeout=30)
        return sorted(set(result.stdout.split())) if result.returncode == 0 else None


class LocalSlurm(SlurmClient):
    def __init__(
        self, root: Path, allowed: Allowed, nodes: int = 0, free_port: Callable[[], int] = any_free_port
    ) -> None:
        """``nodes``: how many namespaced nodes to add beside this machine's (where they can run); ``free_port``
        picks the daemons' ports (the tests hand out ports per pytest-xdist worker)."""
        super().__init__(root / "slurm.conf")
        self.root = root
        self.allowed = allowed
        self._free_port = free_port
        self.host = socket.gethostname().split(".")[0]
        self.started: list[Path] = []  # pid files of the daemons we started, and only those
        self._exported_conf = False
        self._wanted_nodes = nodes
        self.network: NodeNetwork | None = None
        self.multinode_skip: str | None = "no namespaced nodes were asked for" if not nodes else None
        self._hosts_lines: list[str] = []

    @property
    def nodes(self) -> list[str]:
        """The namespaced nodes (partition ``nodes``), in order; empty where they could not be made."""
        return list(self.network.nodes) if self.network else []

    # -- setup -----------------------------------------------------------------------------------------
    def start(self) -> LocalSlurm:
        refuse_real_slurm()  # before installing anything: a real cluster's node gets no apt-get either
        self._ensure_installed()
        self._ensure_hostname()
        self._ensure_munge()
        if self._wanted_nodes:
            self._make_network()
        self._write_config()
        os.environ["SLURM_CONF"] = str(self.conf)  # for submitit and Hydra's launcher inside the tests
        self._exported_conf = True
        self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf), "-c"])
        self._daemon(f"slurmd.{self.host}", ["slurmd", "-f", str(self.conf), "-N", self.host])
        for node in self.nodes:
            assert self.network is not None  # nodes come from the network
            self._daemon(f"slurmd.{node}", self.network.in_node(node, f"exec slurmd -f {self.conf} -N {node}"))
        self._wait_for_idle_node()
        return self

    def _make_network(self) -> None:
        """Namespaced nodes, or the reason they cannot be (the one-node tests run either way)."""
        self.multinode_skip = why_not(self.allowed.edit_hosts, self.allowed.edit_hosts_how)
        if self.multinode_skip:
            return
        network = NodeNetwork(self._wanted_nodes)
        try:
            self.network = network.make()
        except NoNetwork as why:
            network.remove()
            self.multinode_skip = str(why)

    def _ensure_installed(self) -> None:
        missing = [tool for tool in NEEDED if shutil.which(tool) is None]
        if not missing:
            return
        if not self.allowed.install or shutil.which("apt-get") is None:
            raise Unavailable(
                f"{', '.join(missing)} not installed; install Debian's slurm-wlm and munge "
                f"({APT_INSTALL}), or {self.allowed.install_how}"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

        def install() -> subprocess.CompletedProcess:
            return subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
            )

        result = install()
        if result.returncode != 0:  # a stale package index: refresh it once
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
            result = install()
        if result.returncode != 0:
            raise Unavailable(f"apt-get install slurm-wlm munge failed: {result.stderr[-500:]}")

    def _ensure_hostname(self) -> None:
        try:
            socket.gethostbyname(self.host)
            return
        except OSError:
            pass
        if not self.allowed.edit_hosts:
            raise Unavailable(f"hostname {self.host!r} does not resolve; {self.allowed.edit_hosts_how}")
        self._hosts_lines.append(f"127.0.0.1 {self.host}")
        add_hosts_lines(self._hosts_lines)

    def _ensure_munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return  # a munged already serves this machine; use it, do not stop it
        if os.geteuid() != 0:
            raise Unavailable("munged is not running and starting it needs root")
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
        pid_file = Path("/run/munge/munged.pid")
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--pid-file={pid_file}"], check=True)
        self.started.append(pid_file)
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise Unavailable("munged did not start")

    def _write_config(self) -> None:
        # CPUs: at least 4 (config_overrides lets slurmd claim more than it has), so two 2-rank jobs of a sweep run
        # side by side on a 2-core machine instead of one after the other; the ranks run one thread each.
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        memory = self._node_memory_mb()
        cpus = max(4, os.cpu_count() or 1)
        # The namespaced nodes reach the controller on the bridge; this machine's node reaches it there too.
        controller = self.network.controller_address if self.network else "127.0.0.1"
        nodes = "".join(
            f"NodeName={name} NodeAddr={address} NodeHostname={name} CPUs={cpus} RealMemory={memory} State=UNKNOWN\n"
            for name, (_, address) in (self.network.nodes.items() if self.network else [])
        )
        if nodes:
            nodes += (
                f"PartitionName={MULTINODE_PARTITION} Nodes={','.join(self.nodes)} PriorityTier=1 "
                "MaxTime=INFINITE State=UP\n"
            )
        self.conf.write_text(f"""\
ClusterName=fsdpkit-test
SlurmctldHost={self.host}({controller})
SlurmctldPort={self._free_port()}
SlurmdPort={self._free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool" / "%n"}
SlurmctldPidFile={self.root / "slurmctld.pid"}
SlurmdPidFile={self.root / "slurmd.%n.pid"}
SlurmctldLogFile={self.root / "log" / "slurmctld.log"}
SlurmdLogFile={self.root / "log" / "slurmd.%n.log"}
TreeWidth=65533
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
KillWait=30
InactiveLimit=0
MinJobAge=300
SlurmdParameters=config_overrides
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=low Nodes={self.host} Default=YES PriorityTier=1 GraceTime=10 MaxTime=INFINITE State=UP
PartitionName=high Nodes={self.host} PriorityTier=10 MaxTime=INFINITE State=UP
{nodes}""")

    @staticmethod
    def _node_memory_mb() -> int:
        result = subprocess.run(["slurmd", "-C"], capture_output=True, text=True)
        for field in result.stdout.split():
            if field.startswith("RealMemory="):
                return int(int(field.split("=")[1]) * 0.9)
        return 1024

    def _daemon(self, name: str, command: list[str]) -> None:
        """Start a daemon that writes ``<root>/<name>.pid`` (slurm.conf names them so)."""
        pid_file = self.root / f"{name}.pid"
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise Unavailable(f"{name} failed to start: {result.stderr.strip()[-500:]}")
        for _ in range(100):
            if pid_file.is_file() and pid_file.read_text().strip():
                self.started.append(pid_file)
                return
            time.sleep(0.05)
        raise Unavailable(f"{name} wrote no pid file; see {self.root / 'log'}")

    def _wait_for_idle_node(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            result = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)  # a node once per partition
            states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
            if len(states) == 1 + len(self.nodes) and all(state.startswith("idle") for state in states.values()):
                return
            time.sleep(0.2)
        raise Unavailable(f"the nodes never became idle (states {states!r}); see {self.root / 'log'}")

    # -- teardown ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel our jobs and stop our daemons; a no-op where start() got no further than its checks."""
        if self.root / "slurmctld.pid" in self.started and shutil.which("scancel"):
            self.run("scancel", f"--user={os.getuid()}", check=False)  # our controller's jobs: run() sets our conf
            for _ in range(50):  # let the nodes end the steps before their slurmd goes
                if not self.run("squeue", "-h", check=False).stdout.strip():
                    break
                time.sleep(0.2)
        if self.network:
            self.network.kill_leftovers()
        for pid_file in reversed(self.started):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if _alive(pid):
                os.kill(pid, 15)
                for _ in range(100):
                    if not _alive(pid):
                        break
                    time.sleep(0.05)
        self.started.clear()
        if self.network:
            self.network.remove()
            self.network = None
        remove_hosts_lines(self._hosts_lines)
        self._hosts_lines.clear()
        if self._exported_conf:  # never drop a SLURM_CONF the user had set
            os.environ.pop("SLURM_CONF", None)
            self._exported_conf = False
