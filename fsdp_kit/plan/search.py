"""``fsdp-kit plan --search``: price every recipe for a model, a cluster and sequence lengths, rank what fits.

A recipe is precision x sharding x wrap x AC x compile x CPU offload, at the largest batch that fits. The model
is traced once per compute dtype and measured once per wrap policy (``plan.traced`` / ``plan.model_shape``
cache them), so each recipe costs arithmetic only.
"""

from __future__ import annotations

import dataclasses
import itertools
import shlex
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from fsdp_kit.config import TrainConfig, compose_job
from fsdp_kit.errors import ConfigError
from fsdp_kit.plan import GB, Traced, _world, largest_batch, model_shape, traced, traced_work
from fsdp_kit.plan.memory import MemoryBreakdown, ModelShape, breakdown
from fsdp_kit.plan.records import load_records
from fsdp_kit.plan.speed import SpeedEstimate, estimate_speed
from fsdp_kit.policies.config import CheckpointMode, Precision, ShardingStrategy, WrapPolicy

# fp16 is left out: it needs a loss scaler and overflows T5 (config.py warns); pick it by hand where it fits.
PRECISIONS = (Precision.fp32, Precision.bf16, Precision.bf16_pure)
WRAPS = (WrapPolicy.transformer, WrapPolicy.size, WrapPolicy.none)
AC_MODES = CheckpointMode.lightest_first()


@dataclass(frozen=True)
class Candidate:
    job: TrainConfig
    batch: int
    memory: MemoryBreakdown
    speed: SpeedEstimate

    @property
    def tokens_per_s(self) -> float:
        return self.speed.tokens_per_s

    @property
    def overrides(self) -> list[str]:
        """The Hydra overrides that select this recipe."""
        job = self.job
        out = [
            f"precision={job.precision.name}",
            f"sharding={job.sharding.strategy}",
            f"wrap={job.wrap.policy}",
            f"ac={job.ac.mode}",
            f"trainer.batch_size={self.batch}",
        ]
        if job.precision.name == Precision.bf16_pure:
            out.insert(1, "optim=anyprecision")
        if job.trainer.compile:
            out.append("trainer.compile=true")
        if job.sharding.cpu_offload:
            out.append("sharding.cpu_offload=true")
        return out


TIE = 1e-6
"""Relative difference in predicted tokens/s below which two recipes tie (one GPU: every recipe at the same
compute speed ties whatever its batch; the larger batch leaves the most room for the global batch)."""


def _shardings(nodes: int) -> tuple[ShardingStrategy, ...]:
    base = (ShardingStrategy.full_shard, ShardingStrategy.shard_grad_op, ShardingStrategy.no_shard)
    return base + ((ShardingStrategy.hybrid_shard, ShardingStrategy.hybrid_shard_zero2) if nodes > 1 else ())


VARIED = (
    "precision",
    "sharding",
    "sharding.strategy",
    "sharding.cpu_offload",
    "wrap",
    "wrap.policy",
    "ac",
    "ac.mode",
    "trainer.compile",
    "trainer.batch_size",
    "data.max_source_len",
    "data.max_target_len",
)
"""The settings a recipe of the search decides (with ``optim`` for bf16_pure): the user's overrides of them give
way to the recipe's, in what is priced and in the printed command alike."""


def kept(user_overrides: list[str], recipe_keys: AbstractSet[str] = frozenset()) -> list[str]:
    """The user's overrides that a recipe leaves standing: all but those of the settings it decides."""

    def key(item: str) -> str:
        return item.split("=", 1)[0].lstrip("+~").strip()

    return [
        item
        for item in user_overrides
        if key(item) not in VARIED and key(item) not in recipe_keys and not key(item).startswith("precision.")
    ]


def search(job: TrainConfig, overrides: Sequence[str] = ()) -> tuple[list[Candidate], int]:
    """Every recipe that fits ``job.cluster`` at ``job.data``'s lengths, fastest first, and how many were
    priced. The model, data lengths, optimizer settings and cluster come from ``job`` (composed from
    ``overrides``); bf16_pure recipes use the anyprecision optimizer preset (Kahan summation) with the user's
    ``optim.*`` overrides on top, exactly what the printed command composes, the others ``job.optim``."""
    world, gpu_memory_gb = _world(job.cluster)
    job.validated(world, for_training=False)
    cluster = job.cluster
    capacity = gpu_memory_gb * GB
    pure_optim = compose_job([*kept(list(overrides), {"optim"}), "optim=anyprecision"]).optim
    records = load_records()
    found: list[Candidate] = []
    priced = 0
    for precision, strategy, wrap, ac, compiled, offload in itertools.product(
        PRECISIONS, _shardings(cluster.nodes), WRAPS, AC_MODES, (False, True), (False, True)
    ):
        if offload and strategy == ShardingStrategy.no_shard:
            continue  # nothing sharded to keep on the host
        recipe = dataclasses.replace(
            job,
            precision=dataclasses.replace(job.precision, name=precision),
            optim=pure_optim if precision == Precision.bf16_pure else job.optim,
            sharding=dataclasses.replace(job.sharding, strategy=strategy, cpu_offload=offload),
            wrap=dataclasses.replace(job.wrap, policy=wrap),
            ac=dataclasses.replace(job.ac, mode=ac),
            trainer=dataclasses.replace(job.trainer, compile=compiled),
        )
        try:
            recipe.validated(world, for_training=False)
        except ConfigError:
            continue  # e.g. a hybrid shard group that does not divide the world
        priced += 1
        trace, shape = traced(recipe), model_shape(recipe)

        def memory(
            batch: int, recipe: TrainConfig = recipe, shape: ModelShape = shape, trace: Traced = trace
        ) -> MemoryBreakdown:
            return breakdown(recipe, shape, trace.activations, batch, world, cluster.gpus_per_node)

        batch = largest_batch(memory, capacity)
        if not batch:
            continue
        final = dataclasses.replace(recipe, trainer=dataclasses.replace(recipe.trainer, batch_size=batch))
        speed = estimate_speed(final, shape, trace.flops_per_sample, batch, world, traced_work(recipe), records)
        found.append(Candidate(final, batch, memory(batch), speed))
    found.sort(key=lambda c: (-c.tokens_per_s, c.memory.total))
    if found:  # ties with the fastest go to the larger batch, as in README's table (benchmarks/plan_table.py)
        tied = [c for c in found if c.tokens_per_s >= found[0].tokens_per_s * (1 - TIE)]
        found[: len(tied)] = sorted(tied, key=lambda c: -c.batch)  # stable: equal batches keep their order
    return found, priced


def launch_command(best: Candidate, user_overrides: list[str], config_dir: str | None = None) -> str:
    """The command that runs ``best``: ``fsdp-kit slurm`` across nodes, torchrun on one node of several GPUs,
    ``fsdp-kit train`` on one GPU. The user's own overrides come first, minus those of the settings the recipe
    decides (``kept``), so that the command composes the recipe that was priced."""
    job = best.job
    ours = [
        *best.overrides,
        f"data.max_source_len={job.data.max_source_len}",
        f"data.max_target_len={job.data.max_target_len}",
    ]
    theirs = kept(user_overrides, {item.split("=", 1)[0] for item in ours})
    folder = ["--config-dir", config_dir] if config_dir else []
    args = " ".join(shlex.quote(item) for item in [*folder, *theirs, *ours])
    if job.cluster.nodes > 1:
        return f"fsdp-kit slurm {args} -o job.sbatch && sbatch job.sbatch"
    if job.cluster.gpus_per_node > 1:
        return f"torchrun --standalone --nproc_per_node={job.cluster.gpus_per_node} -m fsdp_kit.train {args}"
    return f"fsdp-kit train {args}"
