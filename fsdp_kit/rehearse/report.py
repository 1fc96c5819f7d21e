"""What the rehearsal found, from what the job left behind: the probe's per-rank records, the run dir's metrics and
checkpoints, and the job log. Each row says what held (or not) and the evidence."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from fsdp_kit.checkpoint.marker import MARKER
from fsdp_kit.rehearse.probe import read_jsonl
from fsdp_kit.rehearse.run import Outcome
from fsdp_kit.rehearse.scale import STEPS

LOSS_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Row:
    what: str
    ok: bool
    result: str


def _probe(outcome: Outcome) -> list[dict[str, Any]]:
    return [record for path in sorted(outcome.probe.glob("rank*.jsonl")) for record in read_jsonl(path)]


def _attempts(records: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Layout records per (requeue, restart), rank order."""
    found: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for record in sorted((r for r in records if r["kind"] == "layout"), key=lambda r: r["rank"]):
        found[(record["requeue"], record["restart"])].append(record)
    return dict(sorted(found.items()))


def _ranks_by_node(layouts: list[dict[str, Any]]) -> dict[str, list[int]]:
    nodes: dict[str, list[int]] = defaultdict(list)
    for record in layouts:
        nodes[record["node"]].append(record["rank"])
    return dict(nodes)


def rendezvous(outcome: Outcome, attempts: dict) -> Row:
    first = attempts.get((0, 0), [])
    nodes = _ranks_by_node(first)
    world = outcome.plan.nodes * outcome.plan.procs_per_node
    ok = len(nodes) == outcome.plan.nodes and len(first) == world and all(r["world_size"] == world for r in first)
    hosts = "; ".join(f"{node}: rank {', '.join(map(str, ranks))}" for node, ranks in nodes.items())
    endpoint = first[0]["rendezvous"] if first else "?"
    return Row(
        "rendezvous",
        ok,
        f"{len(first)} of {world} ranks on {len(nodes)} nodes (c10d, store at {endpoint}): {hosts or 'none joined'}",
    )


def shard_groups(attempts: dict) -> Row:
    first = attempts.get((0, 0), [])
    meshes = {json.dumps(r["mesh"]) for r in first}
    if not first or first[0]["mesh"] is None:
        return Row("shard groups", False, "no sharded parameter was found")
    mesh, node_of = first[0]["mesh"], {r["rank"]: r["node"] for r in first}
    ranks = mesh["ranks"] if len(mesh["dims"]) > 1 else [mesh["ranks"]]  # (replicate, shard) or (shard,)

    def on(group: list[int]) -> str:
        return f"[{', '.join(map(str, group))}] on {', '.join(sorted({node_of.get(r, '?') for r in group}))}"

    groups = "; ".join(on(group) for group in ranks)
    replicas = [list(column) for column in zip(*ranks)] if len(ranks) > 1 else []
    text = (
        f"mesh {tuple(mesh['dims'])}, placements {', '.join(mesh['placements'])}. Shard groups (rank i of a group "
        f"holds shard i of every parameter): {groups}"
    )
    text += (
        f". Replicas (the same shard, gradients all-reduced): {'; '.join(on(r) for r in replicas)}"
        if replicas
        else ". Nothing replicated"
    )
    return Row("shard groups", len(meshes) == 1, text + ("" if len(meshes) == 1 else " (ranks disagree!)"))


def _log_lines(outcome: Outcome, needle: str) -> list[str]:
    text = outcome.log.read_text(errors="replace") if outcome.log.is_file() else ""
    return [line.removeprefix("fsdp_kit: ").strip() for line in text.splitlines() if needle in line]


def lost_rank(outcome: Outcome, attempts: dict) -> tuple[Row, Row]:
    said = _log_lines(outcome, f"rank {outcome.lost_rank} (local")
    restarted = [key for key in attempts if key[1] >= 1]
    rejoined = attempts.get(restarted[0], []) if restarted else []
    resumed_at = rejoined[0]["first_step"] if rejoined else None
    world = outcome.plan.nodes * outcome.plan.procs_per_node
    lost = Row("lost rank", bool(said), said[0] if said else f"no line in {outcome.log} names rank {outcome.lost_rank}")
    restart = Row(
        "restart",
        len(rejoined) == world,
        f"all {len(rejoined)} ranks restarted in place (torchrun restart {restarted[0][1]}) and resumed at "
        f"step {resumed_at}"
        if rejoined
        else "no rank restarted",
    )
    return lost, restart


def _saves(outcome: Outcome) -> list[dict[str, Any]]:
    markers = sorted((outcome.run_dir / "checkpoints").glob(f"step_*/{MARKER}"))
    return sorted((json.loads(path.read_text()) for path in markers), key=lambda m: m["step"])


def preemption(outcome: Outcome, attempts: dict) -> tuple[Row, Row]:
    preempted = [m for m in _saves(outcome) if m.get("reason") == "preemption"]
    requeued = [key for key in attempts if key[0] >= 1]
    back = attempts.get(requeued[0], []) if requeued else []
    said = _log_lines(outcome, "requeueing job")
    if preempted:
        step = preempted[0]["step"]
        writers = len(list((outcome.run_dir / "checkpoints" / f"step_{step}").glob("__*.distcp")))
        save = (
            f"SIGUSR2 after step {outcome.preempted_after}: the world of {preempted[0]['world_size']} saved step "
            f"{step} ({writers} ranks wrote shards); {said[0] if said else 'no requeue line in the log'}"
        )
    else:
        save = "no preemption save" + ("" if outcome.preempted_after else " (the job ended before the signal)")
    requeue = (
        (
            f"requeued {requeued[0][0]} time(s); all {len(back)} ranks resumed at step {back[0]['first_step']} in "
            f"the same run dir {outcome.run_dir.name}"
        )
        if back
        else "the job was not requeued"
    )
    return Row("preemption", bool(preempted and said), save), Row("requeue", bool(back), requeue)


def losses(outcome: Outcome) -> Row:
    by_step: dict[int, list[float]] = defaultdict(list)
    for record in read_jsonl(outcome.run_dir / "metrics.jsonl"):
        if "loss" in record and not record.get("summary"):
            by_step[record["step"]].append(record["loss"])
    again = {step: values for step, values in by_step.items() if len(values) > 1}
    worst = max((max(values) - min(values) for values in again.values()), default=None)
    complete = sorted(by_step) == list(range(1, STEPS + 1))
    saved = ", ".join(f"{m['step']} ({m.get('reason', '?')})" for m in _saves(outcome))
    if worst is None:
        return Row("checkpoint, resume", False, f"no step ran twice (checkpoints: {saved})")
    return Row(
        "checkpoint, resume",
        complete and worst <= LOSS_TOLERANCE,
        f"checkpoints at steps {saved}; steps {', '.join(map(str, sorted(again)))} ran before the lost rank "
        f"and again after resuming: largest loss difference {worst:.1e} (<= {LOSS_TOLERANCE:g} to pass); "
        f"steps 1-{STEPS} {'all' if complete else 'NOT all'} trained",
    )


def step_times(records: list[dict[str, Any]]) -> Row:
    """Median step wall time per node, leaving out each attempt's first step (start-up)."""
    firsts = {(r["rank"], r["requeue"], r["restart"]): r["first_step"] for r in records if r["kind"] == "layout"}
    per_node: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r["kind"] == "step" and r["step"] != firsts.get((r["rank"], r["requeue"], r["restart"])):
            per_node[r["node"]].append(r["seconds"])
    text = ", ".join(f"{node} {statistics.median(times):.3f} s" for node, times in sorted(per_node.items()))
    return Row("step time per node", bool(per_node), f"median over the steps: {text or 'none recorded'}")


def findings(outcome: Outcome) -> list[Row]:
    records = _probe(outcome)
    attempts = _attempts(records)
    rows = [
        Row("job", outcome.state == "COMPLETED", f"Slurm job {outcome.job_id} {outcome.state}"),
        rendezvous(outcome, attempts),
        shard_groups(attempts),
        *lost_rank(outcome, attempts),
        *preemption(outcome, attempts),
        losses(outcome),
        step_times(records),
    ]
    return rows


def show(outcome: Outcome, rows: list[Row], console: Console | None = None) -> None:
    console = console or Console(soft_wrap=False, width=160)
    scaled = Table(title="Scaled down to this machine", title_justify="left")
    for column in ("setting", "on the cluster", "in the rehearsal"):
        scaled.add_column(column)
    for change in outcome.plan.changes:
        scaled.add_row(*change)
    console.print(scaled)
    table = Table(
        title=f"Rehearsal: {outcome.plan.nodes} nodes x {outcome.plan.procs_per_node} process(es), "
        f"Slurm job {outcome.job_id}",
        title_justify="left",
    )
    table.add_column("check")
    table.add_column("", width=4)
    table.add_column("what happened")
    for row in rows:
        table.add_row(row.what, "ok" if row.ok else "FAIL", row.result)
    console.print(table)
    console.print(f"job log {outcome.log}; run dir {outcome.run_dir}; the cluster's sbatch {outcome.cluster_sbatch}")
