"""A plain `pip install` of the wheel gives a working tool: every command runs from an empty directory.

The wheel is built without network, installed into a fresh venv that borrows the already-installed
dependencies (torch, transformers, Hydra, ...) through a .pth line, but not this source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import FAST

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the source tree
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding the fsdp_kit wheel."""
    base = tmp_path_factory.mktemp("wheel")
    source, dist = base / "source", base / "dist"
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT / "fsdp_kit", source / "fsdp_kit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
          str(source)], cwd=base)
    wheel = next(dist.glob("fsdp_kit-*.whl"))
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index",
          str(wheel)], cwd=base)
    return venv / "bin"


def test_the_wheel_carries_configs_and_templates(installed, tmp_path):
    where = _run([str(installed / "python"), "-c", "import fsdp_kit, pathlib; print(pathlib.Path(fsdp_kit.__file__)"
                  ".parent)"], cwd=tmp_path).stdout.strip()
    package = Path(where)
    assert str(installed.parent) in where, f"fsdp_kit imported from {where}, not the installed wheel"
    assert (package / "configs" / "train.yaml").is_file()
    assert (package / "configs" / "model" / "t5_3b.yaml").is_file()
    assert (package / "launch" / "job.sbatch.in").is_file()
    # fsdp-kit rehearse: the local cluster, and the folder a rehearsal puts on its jobs' PYTHONPATH
    assert (package / "rehearse" / "cluster.py").is_file() and (package / "rehearse" / "inject" / "sitecustomize.py"
                                                                ).is_file()


def test_train_slurm_and_plan_run_from_an_empty_directory(installed, tmp_path):
    fsdp_kit = str(installed / "fsdp-kit")
    trained = _run([fsdp_kit, "train", *FAST, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path)
    assert "run summary" in trained.stdout
    assert (tmp_path / "run" / "metrics.jsonl").is_file()

    sbatch = _run([fsdp_kit, "slurm", "--no-local-checks", "cluster=p4d", "cluster.nodes=2", "model=t5_3b"],
                  cwd=tmp_path).stdout
    assert "#SBATCH --nodes=2" in sbatch and "model=t5_3b" in sbatch

    plan = _run([fsdp_kit, "plan", "model=t5_small", "cluster=h100", "precision=bf16", "ac=full"], cwd=tmp_path).stdout
    assert "t5_small" in plan and "calibrated:" in plan  # the step-time calibration ships in the wheel


def test_a_users_config_dir_is_searched_beside_the_shipped_configs(installed, tmp_path):
    mine = tmp_path / "my_configs" / "cluster"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("name: mine\nnodes: 3\ngpus_per_node: 4\ngpu: H100-80GB\ngpu_memory_gb: 80\n"
                                    "peak_tflops: 989\n")
    fsdp_kit = str(installed / "fsdp-kit")
    sbatch = _run([fsdp_kit, "slurm", "--no-local-checks", "--config-dir", str(tmp_path / "my_configs"),
                   "cluster=mine"], cwd=tmp_path).stdout
    assert "#SBATCH --nodes=3" in sbatch and "#SBATCH --gpus-per-node=4" in sbatch
    # the job on the nodes composes with the same search path
    assert f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]" in sbatch
    shown = _run([fsdp_kit, "train", "--config-dir", str(tmp_path / "my_configs"), "cluster=mine", "--cfg", "job"],
                 cwd=tmp_path).stdout
    assert "name: mine" in shown and "nodes: 3" in shown
