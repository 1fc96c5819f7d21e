"""The plan, as the console shows it."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fsdp_kit.config import TrainConfig
from fsdp_kit.config_dir import describe
from fsdp_kit.plan import MAX_BATCH, Plan
from fsdp_kit.plan.search import Candidate, launch_command

ASSUMPTIONS = (
    "memory: sharded params/grads/optimizer states per GPU; two FSDP units unsharded at a time with resharding "
    "(all of them without); activations are the bytes autograd saves, traced on meta with GPU-style attention, "
    "plus one layer's backward working set (and its recompute with AC: with selective, less the outputs it kept) "
    "and the gradients of inputs all layers share; 1 GB "
    "workspace; peak = the larger of forward/backward and the optimizer step (its temporaries).",
    "speed: the step's traced FLOPs, bytes and kernels at calibrated efficiencies (fsdp_kit/plan/calibration.py); "
    "collectives overlap compute (step = max); the serial sum is the bound without overlap.",
)


def show(plan: Plan, console: Console | None = None, origins: dict[str, str] | None = None) -> None:
    """The plan; ``origins``: the file each config group came from (config_dir.origins)."""
    console = console or _console()
    job, cluster = plan.job, plan.job.cluster
    machines = f"{cluster.nodes} x {cluster.instance_type or cluster.name} = {plan.world_size} x {cluster.gpu}"
    recipe = (
        f"precision={job.precision.name} sharding={job.sharding.strategy} wrap={job.wrap.policy} "
        f"ac={job.ac.mode} optim={job.optim.name}"
    )
    console.print(
        f"[bold]{job.model.name}[/] ({plan.shape.params / 1e9:.2f}B params, {plan.shape.units} FSDP units) "
        f"on {machines} ({cluster.gpu_memory_gb:g} GB) | {recipe} | "
        f"source/target {job.data.max_source_len}/{job.data.max_target_len} tokens",
        highlight=False,
    )
    _show_origins(console, origins)
    if job.data.packing:
        console.print(
            f"data.packing=true: the batch counts packed rows, each full ({job.data.max_source_len} source "
            "tokens of text, several pairs)",
            highlight=False,
        )
    table = Table(title=f"per-GPU memory at batch {job.trainer.batch_size}")
    table.add_column("part")
    table.add_column("GB", justify="right")
    for part, value in plan.memory.as_gb().items():
        table.add_row(part, f"{value:,.1f}")
    console.print(table)
    verdict = "fits" if plan.fits else "[bold red]does not fit[/]"
    hint = "" if plan.max_batch else " (not even 1: shard more, add AC, or offload)"
    if plan.max_batch >= MAX_BATCH:
        hint = f" (the planner's cap: it tries no batch above {MAX_BATCH}, so larger ones may fit too)"
    console.print(
        f"batch {job.trainer.batch_size} {verdict} in {plan.gpu_memory_gb:g} GB; largest batch that fits: "
        f"[bold]{plan.max_batch}[/]{hint}",
        highlight=False,
    )
    if plan.speed:
        s = plan.speed
        compute = f"compute {s.compute_s:.2f} s at {s.tflops_per_gpu:.0f} TFLOPS/GPU ({escape(s.tflops_source)})"
        assumed = f" ({s.comm_assumed})" if s.comm_assumed else ""
        traffic = f"FSDP traffic {s.comm_gb_per_gpu:.1f} GB/GPU in {s.comm_s:.2f} s{assumed}"
        console.print(
            f"step time at batch {job.trainer.batch_size}: {s.step_s_overlapped:.2f} s with overlap "
            f"({s.step_s_serial:.2f} s without): {compute}, {traffic}; about {s.tokens_per_s:,.0f} tokens/s",
            highlight=False,
        )
    for line in ASSUMPTIONS:
        console.print(f"[dim]{line}[/]", highlight=False)


def show_search(
    found: list[Candidate],
    priced: int,
    job: TrainConfig,
    user_overrides: list[str],
    top: int = 10,
    console: Console | None = None,
    origins: dict[str, str] | None = None,
    config_dir: str | None = None,
) -> None:
    """The ``top`` fastest recipes that fit, and the command that runs the best."""
    console = console or _console()
    cluster = job.cluster
    gpus = cluster.nodes * cluster.gpus_per_node
    machines = (
        f"{cluster.nodes} x {cluster.instance_type or cluster.name} ({gpus} x {cluster.gpu}, "
        f"{cluster.gpu_memory_gb:g} GB)"
    )
    console.print(
        f"[bold]{job.model.name}[/] on {machines}, source/target {job.data.max_source_len}/"
        f"{job.data.max_target_len} tokens: {len(found)} of {priced} recipes fit",
        highlight=False,
    )
    _show_origins(console, origins)
    if not found:
        console.print("[bold red]no recipe fits[/]: add nodes, shorten the sequences, or pick GPUs with more memory")
        return
    table = Table(title=f"fastest {min(top, len(found))} (batch = the largest that fits, per GPU)")
    for name, justify in (
        ("#", "right"),
        ("precision", "left"),
        ("sharding", "left"),
        ("wrap", "left"),
        ("ac", "left"),
        ("compile", "left"),
        ("offload", "left"),
        ("batch", "right"),
        ("peak GB", "right"),
        ("step s", "right"),
        ("tokens/s", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for rank, c in enumerate(found[:top], 1):
        j = c.job
        table.add_row(
            str(rank),
            str(j.precision.name),
            str(j.sharding.strategy),
            str(j.wrap.policy),
            str(j.ac.mode),
            "on" if j.trainer.compile else "off",
            "on" if j.sharding.cpu_offload else "off",
            str(c.batch),
            f"{c.memory.total / 1e9:,.1f}",
            f"{c.speed.step_s_overlapped:.2f}",
            f"{c.tokens_per_s:,.0f}",
        )
    console.print(table)
    best = found[0].speed
    console.print(
        f"[dim]best: {escape(best.tflops_source)}{'; ' + escape(best.comm_assumed) if best.comm_assumed else ''}[/]",
        highlight=False,
    )
    if any(c.batch >= MAX_BATCH for c in found[:top]):
        console.print(
            f"[dim]batch {MAX_BATCH} is the planner's cap: it tries no larger batch, so larger ones may fit too[/]",
            highlight=False,
        )
    console.print("run the best:")
    console.print(escape(launch_command(found[0], user_overrides, config_dir)), highlight=False, soft_wrap=True)
    for line in ASSUMPTIONS:
        console.print(f"[dim]{line}[/]", highlight=False)


def _show_origins(console: Console, origins: dict[str, str] | None) -> None:
    if origins:
        console.print(escape(describe(origins)), highlight=False, soft_wrap=True)


def _console() -> Console:
    """Wide enough for the tables when the output is a file or a pipe (rich assumes 80 columns there)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)
