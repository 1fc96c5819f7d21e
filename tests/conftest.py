"""Shared test helpers: Hydra composition of the shipped configs and real multi-process runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests are small: a thread per process keeps 2-4 ranks from fighting over the 2 CI cores.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """ONE private Slurm on localhost for the whole run (starting it and installing it are paid once).

    It skips every test that asks for it, with the reason, where it cannot run here (not installed and not allowed
    to install, a real Slurm on this machine, ...). It stops only the daemons it started.
    """
    from slurm_cluster import LocalSlurm, Unavailable

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
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
