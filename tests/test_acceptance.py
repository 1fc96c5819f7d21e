"""The GPU acceptance command's CPU rehearsal: `benchmarks/gpu/run.sh --dry` runs every step (offline install
check, smoke grid with save/resume/export, the gpu-marked tests, `fsdp-kit bench`) and writes each result as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# 30 s alone; it runs beside the Slurm file's batch of multi-node jobs, which can take most of the 2 cores for minutes
# (measured 300 s there once): a generous bound, so that the load alone never fails it.
@pytest.mark.timeout(900)
def test_acceptance_command_dry_run_writes_every_result(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "device_out"), "OMP_NUM_THREADS": "1",
           "BENCH_TIMEOUT_S": "600"}  # the dry run's 120 s bench cap, meant for a quiet machine, not for one under load
    result = subprocess.run([str(ROOT / "benchmarks/gpu/run.sh"), "--dry", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "acceptance.json").read_text())
    assert summary["dry"] and summary["device"] == "cpu" and summary["failed_steps"] == []
    smoke = json.loads((out / "smoke.json").read_text())
    assert [case["case"] for case in smoke["cases"]] == ["bf16_ac_full", "save", "resume", "export"]
    assert all(case["ok"] for case in smoke["cases"]) and smoke["cases"][2]["logged_steps"] == [6]
    tests = json.loads((out / "gpu_tests.json").read_text())
    assert tests["counts"]["skipped"] >= 5 and tests["counts"]["failed"] == tests["counts"]["error"] == 0
    assert all("CUDA" in test["detail"] for test in tests["tests"]), "each skip says why"
    bench = json.loads((out / "bench.json").read_text())
    assert [lever["lever"] for lever in bench["levers"]] == ["ac"] and bench["levers"][0]["tflops_gain"] > 0
    assert (tmp_path / "device_out" / "cpu" / "bench.png").is_file(), "results are mirrored under $OUT"


def test_acceptance_command_refuses_a_cpu_machine_without_dry(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run([str(ROOT / "benchmarks/gpu/run.sh"), "--out", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pass --dry" in result.stderr and not any(tmp_path.iterdir())


def test_acceptance_scripts_pass_shellcheck():
    import shutil

    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    for script in ("benchmarks/gpu/run.sh", "benchmarks/gpu/build_wheels.sh"):
        result = subprocess.run([shellcheck, str(ROOT / script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
