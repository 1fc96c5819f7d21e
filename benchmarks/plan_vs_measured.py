"""Compare the planner's per-GPU peak memory with GPU measurements on record.

    python benchmarks/plan_vs_measured.py            # writes benchmarks/results/plan_vs_measured.{json,md}

Measurements come from benchmarks/results/gpu_probe_*.json (each file names its source). Compiled runs are listed
but not counted: the planner does not model what torch.compile's fusion saves.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import provenance, write_json

from fsdp_kit.launch.slurm import compose_job
from fsdp_kit.plan import make_plan

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def main() -> None:
    rows = []
    for source in sorted(RESULTS.glob("gpu_probe_*.json")):
        record = json.loads(source.read_text())
        for run in record["runs"]:
            overrides = [*run["overrides"], f"cluster={run['cluster']}", "data=synthetic", "model.dropout=0.0",
                         f"trainer.batch_size={run['batch']}"]
            plan = make_plan(compose_job(overrides))
            predicted = plan.memory.total
            measured = run["peak_gib"] * GIB
            rows.append({"config": run["label"], "gpu": run["cluster"], "batch": run["batch"],
                         "predicted_gb": predicted / 1e9, "measured_gb": measured / 1e9,
                         "error": predicted / measured - 1.0, "compiled": run["compiled"],
                         "breakdown_gb": plan.memory.as_gb(), "source": source.name})
    counted = [r for r in rows if not r["compiled"]]
    within = sum(abs(r["error"]) <= 0.15 for r in counted)
    write_json(RESULTS / "plan_vs_measured.json", {"provenance": provenance(), "rows": rows,
                                                   "within_15pct": within, "compared": len(counted)})
    lines = [f"Planner vs measured peak memory ({provenance()['date']}; command `{provenance()['command']}`).",
             f"Measured: {', '.join(sorted({r['source'] for r in rows}))}. Predicted: `fsdp-kit plan` for the same "
             "config (GB = 1e9 bytes; measurements read as GiB and converted).", "",
             "| config | GPU | batch | predicted GB | measured GB | error | counted |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        counted_text = "no (compiled)" if r["compiled"] else "yes"
        lines.append(f"| {r['config']} | {r['gpu']} | {r['batch']} | {r['predicted_gb']:.1f} | "
                     f"{r['measured_gb']:.1f} | {100 * r['error']:+.0f}% | {counted_text} |")
    lines += ["", f"Within 15%: {within} of {len(counted)} counted configurations."]
    (RESULTS / "plan_vs_measured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
