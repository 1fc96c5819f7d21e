"""The rehearsal's job: the user's job scaled down to run on this machine, and nothing else changed.

Kept: the model family (architecture, vocabulary, activation, tied embeddings, dropout), wrapping, activation
checkpointing, precision, sharding strategy, optimizer and the node count. Scaled: the model's dimensions (those of
the shipped tiny preset of the same architecture), sequence lengths, steps, and processes per node (capped to what
this machine holds: its cores and memory shared by every node's processes). Replaced: GPUs by CPUs (gloo), the
data by synthetic tokens (the cluster's files are not here), pretrained weights by a random init.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources

import yaml

from fsdp_kit.config import TrainConfig
from fsdp_kit.errors import ConfigError
from fsdp_kit.launch.slurm import procs_per_node

STEPS = 10
"""Training steps of the rehearsal: a lost rank at LOST_AT_STEP, a preemption once past PREEMPT_AFTER_STEP."""
SAVE_EVERY = 2
LOST_AT_STEP = 4
PREEMPT_AFTER_STEP = 4
MAX_SOURCE_LEN, MAX_TARGET_LEN = 64, 16
PROCESS_GB = 1.0
"""Memory one tiny-model trainer takes on CPU (torch and transformers loaded: about 0.6-0.8 GB resident)."""


@dataclass(frozen=True)
class Machine:
    """What this machine holds for every node's processes together."""

    cpus: int
    memory_gb: float

    @classmethod
    def here(cls) -> Machine:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return cls(cpus=len(os.sched_getaffinity(0)), memory_gb=pages / 2**30)


@dataclass
class Rehearsal:
    """The scaled-down job: ``overrides`` go after the user's (the later value wins)."""

    overrides: list[str] = field(default_factory=list)
    changes: list[tuple[str, str, str]] = field(default_factory=list)
    """(setting, on the cluster, in the rehearsal), for the table."""
    nodes: int = 1
    procs_per_node: int = 1

    def set(self, key: str, value: object, cluster_value: object = None, note: str | None = None) -> None:
        self.overrides.append(f"{key}={_hydra_value(value)}")
        if note is not None:
            self.changes.append((key, _shown(cluster_value), note))


def _hydra_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _shown(value: object) -> str:
    return "null" if value is None else str(value)


def tiny_preset(arch: str) -> dict:
    """The shipped ``model/<arch>_tiny.yaml`` hf_config; one clear refusal where the family has none."""
    presets = resources.files("fsdp_kit.configs").joinpath("model")
    for entry in sorted(presets.iterdir(), key=lambda e: e.name):
        if entry.name.endswith("_tiny.yaml"):
            preset = yaml.safe_load(entry.read_text())
            if preset.get("arch") == arch:
                return preset["hf_config"]
    known = sorted(
        yaml.safe_load(entry.read_text()).get("arch")
        for entry in presets.iterdir()
        if entry.name.endswith("_tiny.yaml")
    )
    raise ConfigError(
        f"model.arch={arch!r} has no tiny preset to rehearse with",
        f"rehearse a model of a family with one ({', '.join(known)}), or add model/{arch}_tiny.yaml",
    )


def _dimensions(tiny: dict) -> dict[str, int]:
    """The tiny preset's sizes: its integer settings, except the vocabulary and token ids (the family's own)."""
    return {
        key: value
        for key, value in tiny.items()
        if isinstance(value, int)
        and not isinstance(value, bool)
        and key != "vocab_size"
        and not key.endswith("_token_id")
    }


def processes_per_node(wanted: int, nodes: int, machine: Machine) -> tuple[int, str]:
    """Processes per node here, and why (for the output)."""
    by_cpu = machine.cpus // nodes
    by_memory = int(machine.memory_gb // (nodes * PROCESS_GB))
    cap = max(1, min(by_cpu, by_memory))
    if wanted <= cap:
        return wanted, f"{wanted} as on the cluster"
    return cap, (
        f"capped: this machine holds {cap} per node ({machine.cpus} CPUs, {machine.memory_gb:.0f} GB for {nodes} nodes)"
    )


def scale_down(job: TrainConfig, machine: Machine) -> Rehearsal:
    """The overrides that turn the user's ``job`` into its rehearsal on ``machine``."""
    plan = Rehearsal(nodes=job.cluster.nodes)
    wanted = procs_per_node(job)
    plan.procs_per_node, why = processes_per_node(wanted, job.cluster.nodes, machine)
    plan.set("cluster.gpus_per_node", 0, f"{job.cluster.gpus_per_node} GPUs", "0: CPU processes, gloo")
    plan.set("cluster.efa", False)
    plan.set("slurm.procs_per_node", plan.procs_per_node, wanted, why)
    _shard_group(job, plan, wanted)
    _model(job, plan)
    _data(job, plan, global_batch=job.trainer.batch_size * job.trainer.grad_accum * plan.nodes * plan.procs_per_node)
    _trainer(job, plan)
    return plan


def _shard_group(job: TrainConfig, plan: Rehearsal, wanted: int) -> None:
    """A hybrid shard group keeps spanning the same number of nodes (one node when null, as on the cluster)."""
    size = job.sharding.shard_group_size
    if size is None or plan.procs_per_node == wanted:
        return
    scaled = size // wanted * plan.procs_per_node if size % wanted == 0 else min(size, plan.procs_per_node)
    plan.set("sharding.shard_group_size", scaled, size, f"{scaled}: the same nodes per shard group")


def _model(job: TrainConfig, plan: Rehearsal) -> None:
    tiny = tiny_preset(job.model.arch)
    sizes = _dimensions(tiny) if job.model.hf_config else tiny  # pretrained: its config is on the hub, not here
    for key, value in sizes.items():
        plan.set(f"model.hf_config.{key}", value)
    shape = ", ".join(
        f"{k} {job.model.hf_config.get(k, '?')}->{v}"
        for k, v in _dimensions(tiny).items()
        if job.model.hf_config.get(k) != v
    )
    plan.changes.append(
        ("model", f"{job.model.name} ({job.model.arch})", f"tiny {job.model.arch}: {shape or 'same shape'}")
    )
    if job.model.pretrained:
        plan.set("model.pretrained", None, job.model.pretrained, "null: random init of the tiny shape")


def _data(job: TrainConfig, plan: Rehearsal, global_batch: int) -> None:
    data = job.data
    source_len, target_len = min(data.max_source_len, MAX_SOURCE_LEN), min(data.max_target_len, MAX_TARGET_LEN)
    plan.set("data.source", "synthetic", f"{data.source.value}", "synthetic tokens (the cluster's data is not here)")
    plan.set("data.path", None)
    plan.set("data.tokenizer", "byt5")  # needs no download
    plan.set("data.pad_to_max_length", True)
    plan.set(
        "data.max_source_len",
        source_len,
        f"{data.max_source_len}/{data.max_target_len} tokens",
        f"{source_len}/{target_len}",
    )
    plan.set("data.max_target_len", target_len)
    plan.set("data.num_examples", global_batch * (STEPS + 1))
    plan.set("data.eval_examples", global_batch)
    plan.set("data.num_workers", 0)


def _trainer(job: TrainConfig, plan: Rehearsal) -> None:
    plan.set(
        "trainer.max_steps",
        STEPS,
        job.trainer.max_steps,
        f"{STEPS}: a checkpoint every {SAVE_EVERY}, a rank lost at step {LOST_AT_STEP}, a preemption after "
        f"step {PREEMPT_AFTER_STEP}",
    )
    plan.set("checkpoint.every", SAVE_EVERY)
    plan.set("checkpoint.keep", STEPS)
    plan.set("checkpoint.resume", "auto")
    plan.set("checkpoint.async_save", False)
    plan.set("trainer.warmup_steps", 1)
    plan.set("trainer.log_every", 1)
    plan.set("trainer.eval_every", 0)
    plan.set("trainer.eval_batches", 1)
    plan.set("trainer.eval_generate", False)
    plan.set("trainer.auto_batch", False)
    plan.set("trainer.profile", False)
    plan.set("metrics.progress", False)
    if job.trainer.compile:
        plan.set("trainer.compile", False, True, "false: compiling on CPU takes minutes")
