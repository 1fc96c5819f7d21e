"""Free TCP ports for the tests, without collisions between parallel pytest-xdist workers.

Each worker takes ports from its own block of 500 below the kernel's ephemeral range (32768-60999 on Linux, where
``bind(0)`` and outgoing connections take theirs), so two workers never hand out the same port, and a port found
free is not taken by an outgoing connection before the process it is meant for binds it. submitit's random master
ports (20000-60000) and torchrun's default (29500) lie above the blocks. Within a worker, each call returns the next
free port of its block, so two calls before either port is bound (Slurm's controller and node ports) differ.
"""

from __future__ import annotations

import os
import socket

BASE, BLOCK = 12000, 500


def _block_start() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...; unset without xdist
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    return BASE + (index % 16) * BLOCK


_next = _block_start() + os.getpid() % BLOCK  # two pytest runs side by side start at different places


def free_port() -> int:
    """A port of this worker's block that nothing listens on now (the next one after the last handed out)."""
    global _next
    start = _block_start()
    for _ in range(BLOCK):
        port = start + (_next - start) % BLOCK
        _next = port + 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + BLOCK - 1}")
