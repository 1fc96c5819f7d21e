"""The plan, as the console shows it."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fsdp_kit.plan import Plan

ASSUMPTIONS = (
    "memory: sharded params/grads/optimizer states per GPU; two FSDP units unsharded at a time with resharding "
    "(all of them without); activations are the bytes autograd saves, traced on meta with GPU-style attention, "
    "plus one layer's backward working set (two with AC); 1 GB workspace.",
    "speed: collectives overlap compute (step = max); the serial sum is the bound without overlap.",
)


def show(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    job, cluster = plan.job, plan.job.cluster
    machines = f"{cluster.nodes} x {cluster.instance_type or cluster.name} = {plan.world_size} x {cluster.gpu}"
    recipe = (f"precision={job.precision.name} sharding={job.sharding.strategy} wrap={job.wrap.policy} "
              f"ac={job.ac.mode} optim={job.optim.name}")
    console.print(f"[bold]{job.model.name}[/] ({plan.shape.params / 1e9:.2f}B params, {plan.shape.units} FSDP units) "
                  f"on {machines} ({cluster.gpu_memory_gb:g} GB) | {recipe} | "
                  f"{job.data.max_source_len}/{job.data.max_target_len} tokens", highlight=False)
    table = Table(title=f"per-GPU memory at batch {job.trainer.batch_size}")
    table.add_column("part")
    table.add_column("GB", justify="right")
    for part, value in plan.memory.as_gb().items():
        table.add_row(part, f"{value:,.1f}")
    console.print(table)
    verdict = "fits" if plan.fits else "[bold red]does not fit[/]"
    hint = "" if plan.max_batch else " (not even 1: shard more, add AC, or offload)"
    console.print(f"batch {job.trainer.batch_size} {verdict} in {plan.gpu_memory_gb:g} GB; largest batch that fits: "
                  f"[bold]{plan.max_batch}[/]{hint}", highlight=False)
    if plan.speed:
        s = plan.speed
        compute = f"compute {s.compute_s:.2f} s at {s.tflops_per_gpu:.0f} TFLOPS/GPU ({escape(s.tflops_source)})"
        traffic = f"FSDP traffic {s.comm_gb_per_gpu:.1f} GB/GPU in {s.comm_s:.2f} s"
        console.print(f"step time at batch {job.trainer.batch_size}: {s.step_s_overlapped:.2f} s with overlap "
                      f"({s.step_s_serial:.2f} s without): {compute}, {traffic}; about {s.tokens_per_s:,.0f} tokens/s",
                      highlight=False)
    for line in ASSUMPTIONS:
        console.print(f"[dim]{line}[/]", highlight=False)
