"""What each model needs on each GPU, as the planner sees it: PLANNED, not measured.

    python benchmarks/plan_table.py                       # all models x GPUs -> benchmarks/results/plan_table.{md,json}
    python benchmarks/plan_table.py --readme README.md    # also replace the table between README's markers
    python benchmarks/plan_table.py --models t5_tiny --gpus h100 --output-dir /tmp/out

For every model x GPU: the smallest world size (of --worlds, one GPU first) at which some recipe of
``fsdp-kit plan --search`` fits (``fsdp_kit.plan.search.search``, the full recipe space: precision x sharding x
wrap x AC x compile x CPU offload, each at the largest batch that fits), then the fastest recipe there by predicted
tokens/s, with its batch per GPU and planned peak memory. One GPU is a 1-GPU node; 8, 16, 24 are 1, 2, 3 nodes of 8
GPUs with their instance's NVLink and EFA. The GPUs are described here by overrides of the cluster presets, so the
A100-80GB and H200 single-GPU cases need no presets of their own.

With both t5_11b and h200 selected, the script also checks the planner against the measured fact on record (the
GPU probe: T5-11B fully fine-tunes on one H200 with pure bf16 + AnyPrecision all-bf16 states + full AC at batch 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import provenance, write_json

from fsdp_kit.config import TrainConfig, compose_job
from fsdp_kit.plan import GB, make_plan, model_shape, traced
from fsdp_kit.plan.calibration import shipped
from fsdp_kit.plan.memory import breakdown
from fsdp_kit.plan.records import RESULTS, load_records
from fsdp_kit.plan.search import TIE, Candidate, search

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("t5_small", "t5_base", "t5_large", "t5_3b", "t5_11b")
WORLDS = (1, 8, 16, 24)
GPUS_PER_NODE = 8
README_START = "<!-- plan_table:start (benchmarks/plan_table.py --readme README.md writes this) -->"
README_END = "<!-- plan_table:end -->"
COLUMNS = ("model", "params", "GPU", "GPUs", "precision", "sharding", "wrap", "AC", "compile", "CPU offload",
           "batch/GPU", "peak GB/GPU", "tokens/s", "speed from")


@dataclass(frozen=True)
class GpuSpec:
    """One GPU and the 8-GPU instance that carries it (whose NVLink/EFA the multi-GPU plans use)."""

    label: str
    preset: str
    """Cluster preset with the instance's interconnect (fsdp_kit/configs/cluster/)."""
    gpu: str
    memory_gb: float
    peak_tflops: float
    peak_tflops_fp32: float
    instance: str

    def overrides(self, world: int) -> list[str]:
        if world == 1:
            nodes, per_node = 1, 1
        elif world % GPUS_PER_NODE == 0:
            nodes, per_node = world // GPUS_PER_NODE, GPUS_PER_NODE
        else:
            raise SystemExit(f"error: world size {world} is neither 1 nor a multiple of {GPUS_PER_NODE}. "
                             f"Fix: pass --worlds 1 8 16 24")
        return [f"cluster={self.preset}", f"cluster.nodes={nodes}", f"cluster.gpus_per_node={per_node}",
                f"cluster.gpu={self.gpu}", f"cluster.gpu_memory_gb={self.memory_gb:g}",
                f"cluster.peak_tflops={self.peak_tflops:g}", f"cluster.peak_tflops_fp32={self.peak_tflops_fp32:g}",
                f"cluster.instance_type={self.instance}"]


# Memory as the cluster presets state it (the GPU's nominal size, read by the planner as 1e9 bytes); dense peaks as
# in DESIGN.md. H200 nodes are p5en.48xlarge: the p5's NVLink (900 GB/s) and EFA (3200 Gb/s).
GPUS = {
    "a100_40gb": GpuSpec("A100 40GB", "p4d", "A100-SXM4-40GB", 40, 312, 19.5, "p4d.24xlarge"),
    "a100_80gb": GpuSpec("A100 80GB", "p4de", "A100-SXM4-80GB", 80, 312, 19.5, "p4de.24xlarge"),
    "h100": GpuSpec("H100 80GB", "p5", "H100-SXM5-80GB", 80, 989, 67, "p5.48xlarge"),
    "h200": GpuSpec("H200 141GB", "p5", "H200-141GB", 141, 989, 67, "p5en.48xlarge"),
}


def compose(model: str, gpu: GpuSpec, world: int, source: int, target: int, extra: list[str] = ()) -> TrainConfig:
    return compose_job([f"model={model}", "data=synthetic", f"data.max_source_len={source}",
                        f"data.max_target_len={target}", *gpu.overrides(world), *extra])


def host_gb_per_node(best: Candidate) -> float | None:
    """With CPU offload: the parameter, gradient and optimizer shards of one node's GPUs that live in host RAM."""
    job = best.job
    if not job.sharding.cpu_offload:
        return None
    on_gpu = dataclasses.replace(job, sharding=dataclasses.replace(job.sharding, cpu_offload=False))
    world = job.cluster.nodes * job.cluster.gpus_per_node
    memory = breakdown(on_gpu, model_shape(on_gpu), traced(on_gpu).activations, best.batch, world,
                       job.cluster.gpus_per_node)
    return (memory.params + memory.grads + memory.optimizer) * job.cluster.gpus_per_node / GB


def fastest(found: list[Candidate]) -> Candidate:
    """The search's best, ties in predicted tokens/s going to the largest batch. On one GPU the step has no
    communication, so every recipe with the same compute speed ties whatever its batch; the larger batch leaves
    the most room for the global batch (across GPUs the planner already prefers it: it amortizes the traffic)."""
    top = found[0].tokens_per_s
    tied = [c for c in found if c.tokens_per_s >= top * (1 - TIE)]
    return max(tied, key=lambda c: c.batch)  # max keeps the first (the search's order) among equal batches


def _row(model: str, gpu_key: str, best: Candidate, tried: list[dict[str, int]], variant: str) -> dict[str, Any]:
    job = best.job
    return {"model": model, "variant": variant, "params": model_shape(job).params, "gpu": GPUS[gpu_key].label,
            "gpu_key": gpu_key, "world": job.cluster.nodes * job.cluster.gpus_per_node, "nodes": job.cluster.nodes,
            "precision": str(job.precision.name), "optim": job.optim.name, "sharding": str(job.sharding.strategy),
            "wrap": str(job.wrap.policy), "ac": str(job.ac.mode), "compile": job.trainer.compile,
            "cpu_offload": job.sharding.cpu_offload, "batch": best.batch, "peak_gb": best.memory.total / GB,
            "memory_gb": best.memory.as_gb(), "tokens_per_s": best.tokens_per_s,
            "step_s": best.speed.step_s_overlapped, "tflops_source": best.speed.tflops_source,
            "host_gb_per_node": host_gb_per_node(best), "overrides": [f"model={model}", *best.overrides],
            "tried": tried}


def plan_cell(model: str, gpu_key: str, worlds: list[int], source: int, target: int) -> list[dict[str, Any]]:
    """The smallest world where a recipe fits and the fastest recipe there; when that recipe offloads to the CPU
    (whose host optimizer step the planner does not price), also the smallest world that fits without offload."""
    gpu = GPUS[gpu_key]
    rows: list[dict[str, Any]] = []
    tried: list[dict[str, int]] = []
    for world in worlds:
        found, priced = search(compose(model, gpu, world, source, target))
        on_gpu = [c for c in found if not c.job.sharding.cpu_offload]
        tried.append({"world": world, "priced": priced, "fit": len(found), "fit_without_offload": len(on_gpu)})
        if found and not rows:
            rows.append(_row(model, gpu_key, fastest(found), list(tried), "any"))
            if not rows[0]["cpu_offload"]:
                return rows
        if on_gpu:
            return [*rows, _row(model, gpu_key, fastest(on_gpu), list(tried), "no_offload")]
    shape = model_shape(compose(model, gpu, worlds[0], source, target))
    missing = {"model": model, "variant": "no_offload" if rows else "any", "params": shape.params,
               "gpu": gpu.label, "gpu_key": gpu_key, "world": None, "tried": tried}
    return [*rows, missing]


def check_t5_11b_on_h200(source: int, target: int) -> dict[str, Any]:
    """The planner on the measured recipe (GPU probe 2): does it agree that batch 8 fits one H200, and how do
    its peaks at the measured batches compare?"""
    recipe = ["precision=bf16_pure", "optim=anyprecision", "wrap=transformer", "ac=full"]
    measured = {int(r["batch"]): (float(r["peak_mem_gb"]), r["source"]) for r in load_records(RESULTS)
                if r.get("model") == "t5_11b" and "h200" in str(r.get("device", "")).lower()
                and r.get("precision") == "bf16_pure" and r.get("optim") == "anyprecision" and r.get("ac") == "full"
                and not r.get("compile") and r.get("batch") and r.get("peak_mem_gb") is not None}
    batches = sorted({8, *measured})
    plans = {b: make_plan(compose("t5_11b", GPUS["h200"], 1, source, target, [*recipe, f"trainer.batch_size={b}"]))
             for b in batches}
    plan = plans[8]
    return {"overrides": ["model=t5_11b", *recipe, "trainer.batch_size=8", "cluster=h200"],
            "planned_peak_gb": plan.memory.total / GB, "planned_fits": plan.fits, "planned_max_batch": plan.max_batch,
            "capacity_gb": plan.gpu_memory_gb, "planned_memory_gb": plan.memory.as_gb(),
            "by_batch": [{"batch": b, "planned_gb": plans[b].memory.total / GB,
                          "measured_gb": measured[b][0] if b in measured else None,
                          "measured_source": measured[b][1] if b in measured else None} for b in batches],
            "measured_peak_gb": measured[8][0] if 8 in measured else None,
            "measured_source": measured[8][1] if 8 in measured else None}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def row_cells(row: dict[str, Any]) -> list[str]:
    params = f"{row['params'] / 1e9:.2f}B" if row["params"] >= 1e9 else f"{row['params'] / 1e6:.0f}M"
    if row["world"] is None:
        most = max(t["world"] for t in row["tried"])
        cells = [row["model"], params, row["gpu"], f"> {most}", *["-"] * (len(COLUMNS) - 4)]
        if row["variant"] == "no_offload":
            cells[COLUMNS.index("CPU offload")] = "no"
        return cells
    offload = _yes(row["cpu_offload"])
    if row["host_gb_per_node"] is not None:
        offload += f" ({row['host_gb_per_node']:.0f} GB host RAM/node)"
    speed = "calibrated" + (" + compile on record" if "compile speed-up" in row["tflops_source"]
                            and "none on record" not in row["tflops_source"] else "")
    return [row["model"], params, row["gpu"], str(row["world"]), row["precision"], row["sharding"], row["wrap"],
            row["ac"], _yes(row["compile"]), offload, str(row["batch"]), f"{row['peak_gb']:.1f}",
            f"{row['tokens_per_s']:,.0f}", speed]


def check_text(check: dict[str, Any]) -> str:
    planned = (f"the planner puts that recipe at {check['planned_peak_gb']:.1f} GB at batch 8 "
               f"({'fits' if check['planned_fits'] else 'does not fit'} in the preset's "
               f"{check['capacity_gb']:g} GB; largest batch it allows: {check['planned_max_batch']})")
    measured = check["measured_peak_gb"]
    if measured is None:
        return f"Check, T5-11B on one H200: no measurement on record; {planned}."
    fits = check["planned_fits"] and check["planned_max_batch"] >= 8
    text = (f"Check against the measured fact (DESIGN.md, GPU probe 2): T5-11B fully fine-tunes on one H200 with pure "
            f"bf16 + AnyPrecision all-bf16 states + full AC at batch 8, measured peak {measured:.1f} GB "
            f"({check['measured_source']}); {planned}. The planner "
            + ("agrees that it fits" if fits else "does NOT agree: it says it does not fit")
            + f", but its peak is {abs(check['planned_peak_gb'] / measured - 1):.0%} "
            + ("below" if check["planned_peak_gb"] < measured else "above") + " the measurement")
    pairs = [row for row in check["by_batch"] if row["measured_gb"] is not None]
    if len(pairs) >= 2:
        low, high = pairs[0], pairs[-1]
        span = high["batch"] - low["batch"]
        text += (f" and it grows {(high['planned_gb'] - low['planned_gb']) / span:.2f} GB per sample where the "
                 f"measurements grow {(high['measured_gb'] - low['measured_gb']) / span:.2f} "
                 f"(batch {low['batch']} -> {high['batch']})")
    if check["planned_peak_gb"] < measured:
        text += (", so its largest batch overstates what fits: the table's T5-11B/H200 rows, at the planner's "
                 "largest batch, are likely to run out of memory; start from the measured recipe.")
    else:
        text += "."
    if measured > check["capacity_gb"]:
        text += (f" (The measured peak exceeds the preset's {check['capacity_gb']:g} GB: the nominal size, read as "
                 "1e9 bytes, is below what the GPU holds, which hides part of the under-prediction.)")
    return text


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], check: dict[str, Any] | None) -> str:
    source, target = meta["source_len"], meta["target_len"]
    gpus = ", ".join(f"{spec['label']}: {spec['memory_gb']:g} GB" for spec in meta["gpus"].values())
    lines = [
        f"**PLANNED, not measured.** What each model needs for full fine-tuning at {source} source / {target} target "
        f"tokens: the smallest world size of {', '.join(map(str, meta['worlds']))} GPUs (one GPU first; 8 and up "
        "are nodes of 8 on p4d/p4de/p5/p5en) where some recipe of `fsdp-kit plan --search` fits, and the fastest "
        "recipe there by predicted tokens/s (all GPUs together; ties to the larger batch), at the largest batch per "
        "GPU that fits. Full search "
        "space (precision fp32/bf16/bf16_pure x sharding x wrap x AC x compile x CPU offload); bf16_pure uses "
        "AnyPrecision AdamW (Kahan, bf16 states), the rest torch AdamW. GB = 1e9 bytes; GPU memory is the nominal "
        f"size ({gpus}), as the cluster presets state it. \"speed from\": the planner's step-time model "
        f"(fsdp_kit/plan/calibration.py: {shipped().describe()}; see benchmarks/results/plan_vs_measured.md), "
        "times the compile speed-up measured on record for compiled recipes. "
        "CPU offload needs the host RAM shown (not checked against the machine's), and its tokens/s price "
        "the optimizer step on the host at an assumed 25 GB/s of host memory bandwidth per GPU: where the fastest "
        "recipe offloads, a second row gives the smallest world that fits without offload. Batches are the "
        "planner's largest, at the edge of memory, and it under-predicts some peaks (see the check below and "
        "benchmarks/results/plan_vs_measured.md): "
        "start lower. Predictions only: run `fsdp-kit bench` before renting a cluster on them.",
        "",
        f"Made by `{meta['command']}` at commit {meta['commit']} on {meta['date']}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row_cells(row)) + " |" for row in rows]
    if check is not None:
        lines += ["", check_text(check)]
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"error: {readme} has no plan table markers. Fix: add the lines {README_START!r} and "
                         f"{README_END!r} where the table goes")
    readme.write_text(pattern.sub(lambda _: f"{README_START}\n{table}{README_END}", text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                        help=f"model presets (default: {' '.join(MODELS)})")
    parser.add_argument("--gpus", nargs="+", default=list(GPUS), choices=list(GPUS), metavar="GPU",
                        help=f"GPUs: {' '.join(GPUS)} (default: all)")
    parser.add_argument("--worlds", nargs="+", type=int, default=list(WORLDS), metavar="N",
                        help="world sizes to try, smallest first (default: 1 8 16 24)")
    parser.add_argument("--source-len", type=int, default=512)
    parser.add_argument("--target-len", type=int, default=128)
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where plan_table.{md,json} go")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also write the table into this file between its plan_table markers")
    args = parser.parse_args(argv)
    args.worlds = sorted(set(args.worlds))
    if args.worlds[0] < 1 or args.source_len < 1 or args.target_len < 1:
        parser.error("world sizes and lengths must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = {**provenance(), "commit": git_commit(), "worlds": args.worlds, "source_len": args.source_len,
            "target_len": args.target_len,
            "gpus": {key: dataclasses.asdict(GPUS[key]) for key in args.gpus}}
    rows = []
    for model in args.models:
        for gpu_key in args.gpus:
            for row in plan_cell(model, gpu_key, args.worlds, args.source_len, args.target_len):
                rows.append(row)
                print(" | ".join(row_cells(row)), file=sys.stderr, flush=True)
    check = (check_t5_11b_on_h200(args.source_len, args.target_len)
             if "t5_11b" in args.models and "h200" in args.gpus else None)
    table = markdown(rows, meta, check)
    write_json(args.output_dir / "plan_table.json", {"provenance": meta, "planned_not_measured": True,
                                                     "rows": rows, "t5_11b_on_h200_check": check})
    (args.output_dir / "plan_table.md").write_text(table)
    if args.readme is not None:
        update_readme(args.readme, table)
    print(table)


if __name__ == "__main__":
    main()
