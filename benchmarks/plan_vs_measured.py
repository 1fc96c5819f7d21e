"""Compare the planner's per-GPU peak memory and step time with GPU measurements on record.

    python benchmarks/plan_vs_measured.py            # writes benchmarks/results/plan_vs_measured.{json,md}

Measurements: every record under benchmarks/results/ (fsdp_kit/plan/records.py documents the format: JSON
objects with model, precision, ac, wrap, batch, tflops, tokens_per_s, peak_mem_gb, device, ...; one per file, a
list, or {"records": [...]}, e.g. what the GPU acceptance run writes to benchmarks/results/<device>/), and the
design probe. Records without a peak or a GPU cluster preset matching their device are skipped. Compiled runs are
listed but not counted: the planner does not model what torch.compile's fusion saves. Step time is predicted
without the row's own record (measured TFLOPS of the other matching runs, else the assumed MFU).
"""

from __future__ import annotations

from common import provenance, write_json

from fsdp_kit.launch.slurm import compose_job
from fsdp_kit.plan import make_plan
from fsdp_kit.plan.records import RESULTS, load_records
from fsdp_kit.plan.speed import estimate_speed

CLUSTERS = ("h100", "h200", "a100")
_PRESET = {"a100": "p4de"}


def _cluster(record: dict) -> str | None:
    device = str(record.get("cluster") or record.get("device") or "").lower()
    found = next((name for name in CLUSTERS if name in device), None)
    return _PRESET.get(found, found) if found else None


def main() -> None:
    records = load_records(RESULTS)
    rows = []
    for record in records:
        cluster = _cluster(record)
        if record.get("peak_mem_gb") is None or not record.get("batch") or cluster is None:
            continue
        overrides = record.get("overrides") or [
            f"model={record['model']}", f"precision={record['precision']}", f"ac={record['ac']}",
            f"wrap={record.get('wrap', 'transformer')}", f"optim={record.get('optim', 'adamw')}"]
        overrides = [*overrides, f"cluster={cluster}", "cluster.nodes=1", "cluster.gpus_per_node=1", "data=synthetic",
                     "model.dropout=0.0", f"trainer.batch_size={record['batch']}",
                     f"data.max_source_len={record.get('source_len', 512)}",
                     f"data.max_target_len={record.get('target_len', 128)}",
                     f"trainer.compile={str(bool(record.get('compile'))).lower()}"]
        plan = make_plan(compose_job(overrides))
        others = [r for r in records if r is not record]
        from fsdp_kit.plan import traced

        trace = traced(plan.job)
        speed = estimate_speed(plan.job, plan.shape, trace.flops_per_sample, plan.job.trainer.batch_size, 1,
                               len(trace.activations.per_layer), others)
        predicted, measured = plan.memory.total / 1e9, float(record["peak_mem_gb"])
        tokens = record.get("tokens_per_s")
        rows.append({"config": record.get("label") or " ".join(overrides[:5]), "gpu": cluster,
                     "batch": record["batch"], "predicted_gb": predicted, "measured_gb": measured,
                     "error": predicted / measured - 1.0, "compiled": bool(record.get("compile")),
                     "breakdown_gb": plan.memory.as_gb(), "source": record["source"],
                     "predicted_tokens_per_s": speed.tokens_per_s, "measured_tokens_per_s": tokens,
                     "step_error": (tokens / speed.tokens_per_s - 1.0) if tokens else None,
                     "tflops_source": speed.tflops_source})
    counted = [r for r in rows if not r["compiled"]]
    within = sum(abs(r["error"]) <= 0.15 for r in counted)
    step_within = sum(r["step_error"] is not None and abs(r["step_error"]) <= 0.25 for r in counted)
    write_json(RESULTS / "plan_vs_measured.json", {"provenance": provenance(), "rows": rows,
                                                   "within_15pct": within, "step_within_25pct": step_within,
                                                   "compared": len(counted)})
    lines = [f"Planner vs measured ({provenance()['date']}; command `{provenance()['command']}`).",
             f"Measured: {', '.join(sorted({r['source'] for r in rows}))}. Predicted: `fsdp-kit plan` for the same "
             "config (GB = 1e9 bytes). Step error = predicted step time / measured - 1, predicted without the row's "
             "own record.", "",
             "| config | GPU | batch | predicted GB | measured GB | memory error | step error | counted |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        counted_text = "no (compiled)" if r["compiled"] else "yes"
        step = f"{100 * r['step_error']:+.0f}%" if r["step_error"] is not None else "-"
        lines.append(f"| {r['config']} | {r['gpu']} | {r['batch']} | {r['predicted_gb']:.1f} | "
                     f"{r['measured_gb']:.1f} | {100 * r['error']:+.0f}% | {step} | {counted_text} |")
    lines += ["", f"Memory within 15%: {within} of {len(counted)} counted; step time within 25%: {step_within}."]
    (RESULTS / "plan_vs_measured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
