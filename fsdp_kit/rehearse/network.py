"""Nodes of the local cluster on one machine: a network namespace, a veth link into a private bridge and a hosts
line per node (DESIGN.md section 4, "Several Slurm nodes on one machine").

Everything made is recorded as it is made, so ``remove()`` undoes exactly that (also after a partial start), and
names carry this process's id, so two runs side by side, or the leftovers of a killed one, never collide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

HOSTS = Path("/etc/hosts")
SUBNET_PREFIX = "10.213"  # 10.213.K.0/24: K is picked among the /24s that no interface or route of this machine uses


class NoNetwork(Exception):
    """Namespaces cannot be made here; the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NoNetwork(f"`ip {' '.join(args)}` failed: {result.stderr.strip()[-300:]}")
    return result


def why_not(edit_hosts: bool, how_to_allow: str) -> str | None:
    """Why namespaced nodes cannot run here, or None. ``edit_hosts``: the caller lets us add the node names to
    /etc/hosts (and remove them again); ``how_to_allow`` says how, for the refusal."""
    if os.geteuid() != 0:
        return "network namespaces and a bridge need root"
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if _ip("netns", "list", check=False).returncode != 0:
        return "`ip netns` does not work here"
    if not edit_hosts:
        return f"the node names must go into /etc/hosts; {how_to_allow}"
    return None


def _free_subnet() -> str:
    used = _ip("-4", "-o", "addr").stdout + _ip("-4", "route").stdout
    start = os.getpid() % 200
    for k in range(200):
        candidate = f"{SUBNET_PREFIX}.{(start + k) % 200 + 20}"
        if f"{candidate}." not in used:
            return candidate
    raise NoNetwork(f"every {SUBNET_PREFIX}.K.0/24 is in use on this machine")


def add_hosts_lines(lines: list[str]) -> None:
    with HOSTS.open("a") as hosts:  # appended in place: /etc/hosts is often a bind mount
        hosts.write("".join(f"{line}\n" for line in lines))


def remove_hosts_lines(lines: list[str]) -> None:
    """Remove exactly ``lines`` (each once, as added) from /etc/hosts, rewriting it in place."""
    if not lines:
        return
    kept = HOSTS.read_text().splitlines(keepends=True)
    for line in lines:
        if f"{line}\n" in kept:
            kept.remove(f"{line}\n")
    with HOSTS.open("r+") as hosts:
        hosts.write("".join(kept))
        hosts.truncate()


class NodeNetwork:
    """``count`` namespaced nodes on a bridge; ``nodes`` maps node name -> (namespace, address)."""

    def __init__(self, count: int) -> None:
        tag = os.getpid()
        self.tag = tag
        self.bridge = f"fk{tag}br"
        self.subnet = ""
        self.nodes: dict[str, tuple[str, str]] = {}
        self._count = count
        self._made: list[tuple[str, str]] = []  # ("netns"|"link"|"hosts", name or line), in the order made

    @property
    def controller_address(self) -> str:
        return f"{self.subnet}.1"

    def make(self) -> NodeNetwork:
        self.subnet = _free_subnet()
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.controller_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        lines = []
        for i in range(1, self._count + 1):
            name, ns, address = f"fk{self.tag}n{i}", f"fsdpkit-{self.tag}-n{i}", f"{self.subnet}.{10 + i}"
            outer, inner = f"fk{self.tag}v{i}", f"fk{self.tag}p{i}"
            _ip("netns", "add", ns)
            self._made.append(("netns", ns))
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self._made.append(("link", outer))  # deleting one end deletes the pair
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.nodes[name] = (ns, address)
            lines.append(f"{address} {name}")
        self._add_hosts_lines(lines)
        return self

    def _add_hosts_lines(self, lines: list[str]) -> None:
        add_hosts_lines(lines)
        self._made += [("hosts", line) for line in lines]

    def link(self, node: str) -> str:
        """The bridge side of ``node``'s link: down, the node is cut off."""
        return f"fk{self.tag}v{list(self.nodes).index(node) + 1}"

    def set_link(self, node: str, up: bool) -> None:
        _ip("link", "set", self.link(node), "up" if up else "down")

    def in_node(self, node: str, command: str) -> list[str]:
        """argv that runs shell ``command`` inside ``node``: its network namespace and a UTS namespace of its own
        (not `ip netns exec`, which remounts /sys: slurmd then finds no cgroup tree and refuses to start)."""
        return [
            "nsenter",
            f"--net=/var/run/netns/{self.nodes[node][0]}",
            "unshare",
            "--uts",
            "sh",
            "-c",
            f"hostname {node} && {command}",
        ]

    def kill_leftovers(self) -> None:
        """SIGKILL what still runs in our namespaces (job steps of a cancelled job): they are processes we made."""
        for kind, ns in self._made:
            if kind != "netns":
                continue
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
        time.sleep(0.2)

    def remove(self) -> None:
        """Undo everything made, newest first; never raises (teardown)."""
        remove_hosts_lines([value for kind, value in self._made if kind == "hosts"])
        for kind, value in reversed(self._made):
            if kind == "link":
                _ip("link", "del", value, check=False)
            elif kind == "netns":
                _ip("netns", "del", value, check=False)
        self._made.clear()
        self.nodes.clear()
