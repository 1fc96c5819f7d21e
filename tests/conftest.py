"""Shared test helpers: Hydra composition of the shipped configs and real multi-process runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests are small: a thread per process keeps 2-4 ranks from fighting over the 2 CI cores. OMP_NUM_THREADS does
# the same for the processes the tests start (the CLI, torchrun, Slurm jobs): with the workers of pytest-xdist
# beside them, idle OpenMP threads spinning for work cost CPU time that the other tests need.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _slurm_tests_in_one_file_first(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The files that take longest (measured on 2 cores, 2026-11-23), slowest first: under xdist they are handed out
# first, so that none of them is left to run alone at the end. The Slurm file leads, whatever this list says.
LONGEST_FIRST = ("test_checkpoint.py", "test_train.py", "test_acceptance.py", "test_plan.py", "test_wheel.py",
                 "test_optim_resume.py", "test_parity.py", "test_matrix.py", "test_batch_size.py")


def _slurm_tests_in_one_file_first(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs the tests in parallel with ``-n N --dist loadfile --no-loadscope-reorder`` (pytest-xdist):
    each file on one worker, so a module's fixtures are built once, handed out in the order of ``items``. The tests
    of the private Slurm (the session-scoped ``slurm`` fixture, which refuses to start beside another Slurm) share
    one cluster, one job after the other: they must stay in one file, which goes first under xdist since it is the
    longest chain (it mostly waits for Slurm); then ``LONGEST_FIRST``, then the rest in collection order."""
    files = sorted({str(item.path) for item in items if "slurm" in getattr(item, "fixturenames", ())})
    if len(files) > 1:
        raise pytest.UsageError(f"tests in {', '.join(files)} use the slurm fixture: keep them in one file (with "
                                "--dist loadfile a second worker would skip them, a Slurm already running)")
    if hasattr(config, "workerinput"):  # an xdist worker: the scheduler hands out files in this order

        def rank(item: pytest.Item) -> int:
            if str(item.path) in files:
                return -1
            return LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST)

        items.sort(key=rank)  # stable: within a file and among the rest, collection order


# Namespaced nodes beside this machine's (fsdp_kit/rehearse/network.py): the multi-node tests use up to 3, and a 4th
# for the job whose node loses its network.
MULTINODE_NODES = 4


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """ONE private Slurm on localhost for the whole run (starting it and installing it are paid once): this
    machine's node, and where it can, MULTINODE_NODES namespaced nodes in partition ``nodes`` (``slurm.nodes``).

    It skips every test that asks for it, with the reason, where it cannot run here (not installed and not allowed
    to install, a real Slurm on this machine, ...). It stops only the daemons it started.
    """
    from ports import free_port

    from fsdp_kit.rehearse.cluster import Allowed, LocalSlurm, Unavailable

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), Allowed.for_tests(), nodes=MULTINODE_NODES,
                         free_port=free_port)
    try:
        cluster.start()
    except Unavailable as why:
        cluster.stop()
        pytest.skip(f"no local Slurm: {why}")
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
