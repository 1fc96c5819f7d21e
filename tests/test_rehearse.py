"""``fsdp-kit rehearse`` without Slurm: the scaled-down job and the refusals (the run itself: tests/test_slurm.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

from fsdp_kit.config import compose_job
from fsdp_kit.errors import ConfigError
from fsdp_kit.launch.slurm import check, procs_per_node
from fsdp_kit.rehearse.cluster import NEEDED, pid_of
from fsdp_kit.rehearse.machine import check_can_start
from fsdp_kit.rehearse.scale import Machine, scale_down

ROOT = Path(__file__).resolve().parent.parent
SMALL, BIG = Machine(cpus=2, memory_gb=8), Machine(cpus=64, memory_gb=512)
JOB = ["experiment=t5_11b_a100_3nodes"]


def _scaled(overrides: list[str], machine: Machine):
    job = compose_job(overrides)
    plan = scale_down(job, machine)
    scaled = compose_job([*overrides, *plan.overrides])
    check(scaled, local_checks=False)  # a job the trainer and Slurm accept
    return job, plan, scaled


def test_the_rehearsal_keeps_family_wrapping_precision_sharding_and_nodes_and_caps_processes():
    job, plan, scaled = _scaled(JOB, SMALL)
    for part in ("wrap", "precision", "sharding", "ac", "optim"):
        assert getattr(scaled, part) == getattr(job, part), part
    assert scaled.model.arch == "t5" and scaled.cluster.nodes == 3 and scaled.cluster.gpus_per_node == 0
    kept = ("vocab_size", "feed_forward_proj", "tie_word_embeddings", "pad_token_id", "decoder_start_token_id")
    assert {k: scaled.model.hf_config[k] for k in kept} == {k: job.model.hf_config[k] for k in kept}
    assert scaled.model.hf_config["d_model"] == 128 and scaled.model.hf_config["num_layers"] == 2
    assert (procs_per_node(job), procs_per_node(scaled)) == (8, 1)
    said = {setting: here for setting, _, here in plan.changes}
    assert said["slurm.procs_per_node"] == "capped: this machine holds 1 per node (2 CPUs, 8 GB for 3 nodes)"
    assert procs_per_node(compose_job([*JOB, *scale_down(job, BIG).overrides])) == 8  # room for all: not capped


def test_a_hybrid_shard_group_keeps_spanning_one_node_and_pretrained_weights_become_a_random_init():
    overrides = [*JOB, "sharding=hybrid_shard", "sharding.shard_group_size=8", "model.pretrained=google-t5/t5-11b"]
    _, _, scaled = _scaled(overrides, Machine(cpus=12, memory_gb=64))
    assert scaled.slurm.procs_per_node == 4 and scaled.sharding.shard_group_size == 4
    assert scaled.model.pretrained is None and scaled.sharding.strategy.value == "hybrid_shard"
    _, _, gpt2 = _scaled(["model=gpt2_tiny", "cluster=p4d", "cluster.nodes=2"], SMALL)
    assert gpt2.model.arch == "gpt2" and gpt2.model.hf_config["n_embd"] == 128


def test_a_family_without_a_tiny_preset_is_refused():
    job = compose_job([*JOB, "model.arch=mistral"])
    with pytest.raises(ConfigError, match=r"model\.arch=.mistral. has no tiny preset to rehearse with"):
        scale_down(job, SMALL)


def _rehearse(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    workdir = tmp_path / "rehearsal"
    result = run_cli("rehearse", "--workdir", str(workdir), *args, *JOB, cwd=ROOT, env=env)
    assert result.code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0], workdir


def _refusal_as_nobody() -> str:
    """check_can_start's refusal in a forked child whose effective user is not root (a pipe brings it back)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.seteuid(65534)
            check_can_start(3, edit_hosts=True)
            os.write(write, b"not refused")
        except ConfigError as err:
            os.write(write, str(err).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as answer:
        return answer.read()


def test_an_unusable_machine_is_refused_in_one_line_before_anything_is_started_or_written(tmp_path):
    if os.geteuid() != 0:
        line, workdir = _rehearse(tmp_path)
        assert "needs root" in line and "--slurm-conf" in line
        assert not workdir.exists()
        return
    assert "needs root. Fix: run it as root" in _refusal_as_nobody()
    empty = tmp_path / "bin"
    empty.mkdir()
    line, workdir = _rehearse(tmp_path, env={"PATH": str(empty)})
    assert "not installed" in line and "apt-get install -y --no-install-recommends slurm-wlm munge" in line
    if all(shutil.which(tool) for tool in (*NEEDED, "ip", "nsenter", "unshare")):
        line, _ = _rehearse(tmp_path, env={"SLURM_CONF": "/etc/slurm/slurm.conf"})
        # the suite's own Slurm (tests/test_slurm.py) may be running beside this test: refused as a real one too
        assert "set up for a real Slurm (SLURM_CONF=/etc/slurm/slurm.conf" in line or "already running" in line
        if not any(pid_of(name) for name in ("slurmctld", "slurmd")):
            line, _ = _rehearse(tmp_path, env={"FSDP_KIT_EDIT_HOSTS": "0"})
            assert "the node names must go into /etc/hosts" in line and "pass --edit-hosts" in line
    assert not workdir.exists()


def test_bad_input_is_refused_in_one_line(tmp_path):
    line, _ = _rehearse(tmp_path, "--slurm-conf", str(tmp_path / "nope.conf"))
    assert f"--slurm-conf {tmp_path / 'nope.conf'} does not exist" in line
    (tmp_path / "rehearsal").mkdir()
    (tmp_path / "rehearsal" / "keep.txt").write_text("mine")
    line, _ = _rehearse(tmp_path)
    assert "exists and is not empty" in line and (tmp_path / "rehearsal" / "keep.txt").read_text() == "mine"
    line, _ = _rehearse(tmp_path, "cluster.nodes=0")
    assert "cluster.nodes=0 must be at least 1" in line
