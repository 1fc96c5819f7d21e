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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _group_tests_that_share_fixtures(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _group_tests_that_share_fixtures(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n N --dist loadgroup``), tests that use the same module- or session-scoped fixture of
    ours run on one worker, so that the fixture is built once: ONE local Slurm (the ``slurm`` fixture refuses to
    start beside another), one wheel venv, one reference run per module. Tests linked through a shared fixture
    form one group (``xdist_group``); without xdist the marks change nothing."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    shared: dict[pytest.Item, list[str]] = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        names = []
        for name, defs in (info.name2fixturedefs.items() if info else ()):
            fixture = defs[-1]
            if fixture.scope in ("module", "session") and str(fixture.baseid or "").startswith("tests"):
                names.append(f"{fixture.baseid}::{name}")
        shared[item] = names
        for name in names[1:]:
            parent[root(name)] = root(names[0])
    for item, names in shared.items():
        if names:
            item.add_marker(pytest.mark.xdist_group(root(names[0])))


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
