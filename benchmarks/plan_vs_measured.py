"""Compare the planner's per-GPU peak memory and step time with GPU measurements on record; refit its step time.

    python benchmarks/plan_vs_measured.py          # writes benchmarks/results/plan_vs_measured.{json,md}
    python benchmarks/plan_vs_measured.py --fit    # first refits fsdp_kit/plan/calibration.json to the records

Measurements: every record under benchmarks/results/ (fsdp_kit/plan/records.py documents the format: JSON
objects with model, precision, ac, wrap, batch, tflops, tokens_per_s, peak_mem_gb, device, ...; one per file, a
list, or {"records": [...]}, e.g. what the GPU acceptance run writes to benchmarks/results/<device>/), and the
design probe. Records without a step time or peak, or without a GPU cluster preset matching their device, are
skipped. Compiled runs are listed but neither counted nor fitted: the planner does not model what torch.compile's
fusion saves (it applies the compile speed-up measured on record). Step error is reported twice: with the
calibration in use (in-sample when it was fitted to these rows), and leave-one-out (fitted to the other rows).
"""

from __future__ import annotations

import argparse
import dataclasses

from common import provenance, write_json

from fsdp_kit.config import compose_job
from fsdp_kit.plan import calibration, make_plan, model_shape, traced_work
from fsdp_kit.plan.records import RESULTS, load_records
from fsdp_kit.plan.speed import observation

CLUSTERS = ("h100", "h200", "a100")
_PRESET = {"a100": "p4de"}
UNFITTED = calibration.Calibration(1.0, 1.0, 1.0, 0.0)
"""Where a term has no measurement to fit it: the GPU's nominal peak and bandwidth, no kernel gaps."""


def _cluster(record: dict) -> str | None:
    device = str(record.get("cluster") or record.get("device") or "").lower()
    found = next((name for name in CLUSTERS if name in device), None)
    return _PRESET.get(found, found) if found else None


def _job(record: dict, cluster: str):
    overrides = record.get("overrides") or [
        f"model={record['model']}", f"precision={record['precision']}", f"ac={record['ac']}",
        f"wrap={record.get('wrap', 'transformer')}", f"optim={record.get('optim', 'adamw')}"]
    overrides = [*overrides, f"cluster={cluster}", "cluster.nodes=1", "cluster.gpus_per_node=1", "data=synthetic",
                 "model.dropout=0.0", f"trainer.batch_size={record['batch']}",
                 f"data.max_source_len={record.get('source_len', 512)}",
                 f"data.max_target_len={record.get('target_len', 128)}",
                 f"trainer.compile={str(bool(record.get('compile'))).lower()}"]
    return compose_job(overrides), overrides


def _measured_step_s(record: dict) -> float | None:
    tokens = record.get("tokens_per_s")
    if not tokens:
        return None
    return record["batch"] * (record.get("source_len", 512) + record.get("target_len", 128)) / float(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit", action="store_true", help="refit fsdp_kit/plan/calibration.json to the records")
    args = parser.parse_args()
    rows = []
    for record in load_records(RESULTS):
        cluster = _cluster(record)
        if not record.get("batch") or cluster is None:
            continue
        job, overrides = _job(record, cluster)
        label = f"{record['source']}: {record.get('label') or ' '.join(overrides[:5])} batch {record['batch']}"
        measured_s = _measured_step_s(record)
        terms = observation(job, model_shape(job), traced_work(job), job.trainer.batch_size, 1,
                            measured_s or 0.0, label)
        rows.append({"record": record, "job": job, "overrides": overrides, "cluster": cluster, "terms": terms})
    fitted = [r["terms"] for r in rows if not r["record"].get("compile") and r["terms"].measured_s]
    if args.fit:
        previous = calibration.load() if calibration.CALIBRATION_FILE.exists() else UNFITTED
        new = calibration.fit(fitted, dataclasses.replace(previous, fitted_on=()))
        calibration.save(new, **provenance())
        calibration.shipped.cache_clear()
    in_use = calibration.load()
    table = []
    for row in rows:
        record, terms = row["record"], row["terms"]
        plan = make_plan(row["job"])
        step_error = loo_error = None
        if terms.measured_s:
            step_error = plan.speed.step_s_overlapped / terms.measured_s - 1.0
            if not record.get("compile"):
                others = [t for t in fitted if t is not terms]
                loo = calibration.fit(others, UNFITTED)  # a term only this row exercises: the nominal peak
                loo_error = calibration.predict(loo, terms) / terms.measured_s - 1.0
        predicted_gb = plan.memory.total / 1e9
        measured_gb = record.get("peak_mem_gb")
        table.append({"config": record.get("label") or " ".join(row["overrides"][:5]), "gpu": row["cluster"],
                      "batch": record["batch"], "predicted_gb": predicted_gb, "measured_gb": measured_gb,
                      "error": predicted_gb / float(measured_gb) - 1.0 if measured_gb else None,
                      "compiled": bool(record.get("compile")), "breakdown_gb": plan.memory.as_gb(),
                      "source": record["source"], "measured_step_s": terms.measured_s or None,
                      "predicted_step_s": plan.speed.step_s_overlapped, "step_error": step_error,
                      "step_error_leave_one_out": loo_error, "terms": dataclasses.asdict(terms),
                      "tflops_source": plan.speed.tflops_source})
    counted = [r for r in table if not r["compiled"]]
    within = sum(r["error"] is not None and abs(r["error"]) <= 0.15 for r in counted)
    step_within = sum(r["step_error"] is not None and abs(r["step_error"]) <= 0.25 for r in counted)
    loo_within = sum(r["step_error_leave_one_out"] is not None and abs(r["step_error_leave_one_out"]) <= 0.25
                     for r in counted)
    write_json(RESULTS / "plan_vs_measured.json", {
        "provenance": provenance(), "calibration": dataclasses.asdict(in_use), "rows": table,
        "within_15pct": within, "step_within_25pct": step_within, "step_within_25pct_leave_one_out": loo_within,
        "compared": len(counted)})

    def pct(value: float | None) -> str:
        return f"{100 * value:+.0f}%" if value is not None else "-"

    lines = [f"Planner vs measured ({provenance()['date']}; command `{provenance()['command']}`).",
             f"Measured: {', '.join(sorted({r['source'] for r in table}))}. Predicted: `fsdp-kit plan` for the same "
             "config (GB = 1e9 bytes). Step error = predicted compute time of a step / measured step time - 1; "
             f"calibration in use: {in_use.describe()}. Leave-one-out: the same with the calibration fitted to the "
             "other counted rows.", "",
             "| config | GPU | batch | predicted GB | measured GB | memory error | step error | leave-one-out "
             "| counted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        measured = f"{r['measured_gb']:.1f}" if r["measured_gb"] else "-"
        lines.append(f"| {r['config']} | {r['gpu']} | {r['batch']} | {r['predicted_gb']:.1f} | {measured} | "
                     f"{pct(r['error'])} | {pct(r['step_error'])} | {pct(r['step_error_leave_one_out'])} | "
                     f"{'no (compiled)' if r['compiled'] else 'yes'} |")
    lines += ["", f"Memory within 15%: {within} of {len(counted)} counted; step time within 25%: {step_within} "
                  f"(leave-one-out: {loo_within})."]
    (RESULTS / "plan_vs_measured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
