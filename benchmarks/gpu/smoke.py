"""The acceptance command's smoke grid: the tiny model a few steps under each switch, then save, resume and export.

    python benchmarks/gpu/smoke.py --out DIR          # on a GPU: every precision, wrap, AC, compile, CPU offload
    python benchmarks/gpu/smoke.py --out DIR --dry    # on CPU: a small grid, same save/resume/export

Each case runs in this process (one rank) and is recorded whether it passes or not: smoke.json holds, per case,
ok, seconds, the first and last loss, the trainer's summary, and the error with its traceback's tail. Exit code 1
when any case failed.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fsdp_kit.config import compose_job
from fsdp_kit.train import run

TINY = ["model=t5_tiny", "data.num_examples=256", "data.eval_examples=16", "data.pad_to_max_length=true",
        "data.max_source_len=48", "data.max_target_len=8", "trainer.batch_size=4", "trainer.max_steps=4",
        "trainer.warmup_steps=1", "trainer.log_every=2", "trainer.eval_every=0", "trainer.eval_generate=false",
        "checkpoint.at_end=false", "metrics.progress=false", "model.dropout=0.0"]

# One switch at a time from the base (bf16 mixed, transformer wrap, no AC, eager).
GPU_GRID: dict[str, list[str]] = {
    "bf16": ["precision=bf16"],
    "fp32": ["precision=fp32"],
    "fp16_scaler": ["precision=fp16"],
    "bf16_pure_anyprecision": ["precision=bf16_pure", "optim=anyprecision", "optim.use_kahan_summation=true"],
    "wrap_size": ["precision=bf16", "wrap=size", "wrap.min_num_params=100000"],
    "wrap_none": ["precision=bf16", "wrap=none"],
    "ac_full": ["precision=bf16", "ac=full"],
    "compile": ["precision=bf16", "trainer.compile=true"],
    "cpu_offload": ["precision=bf16", "sharding.cpu_offload=true"],
    "auto_batch": ["precision=bf16", "trainer.auto_batch=true", "trainer.auto_batch_max=16"],
}
DRY_GRID: dict[str, list[str]] = {  # fp32 runs in save/resume below
    "bf16_ac_full": ["precision=bf16", "ac=full"],
}


def _case(name: str, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    began = time.perf_counter()
    record: dict[str, Any] = {"case": name, "overrides": overrides}
    try:
        result = run(compose_job([*TINY, *overrides, f"run_dir={run_dir}"]), console=Console(file=io.StringIO()))
        losses = list(result.losses.values())
        record.update(ok=all(map(_finite, losses)), first_loss=losses[0], last_loss=losses[-1],
                      summary=result.summary, history=result.history)
    except Exception as err:  # a smoke grid records every failure and goes on
        record.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
    record["seconds"] = time.perf_counter() - began
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"smoke: {name}: {'ok' if record['ok'] else 'FAILED ' + record.get('error', 'non-finite loss')} "
          f"({record['seconds']:.1f} s)", flush=True)
    return record


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _save_resume_export(work: Path, precision: str) -> list[dict[str, Any]]:
    """Train 4 steps saving every 2, resume to 6, export the last checkpoint and load it with transformers."""
    run_dir = work / "resume"
    common = [f"precision={precision}", "checkpoint.every=2", "checkpoint.at_end=true"]
    first = _case("save", [*common, "trainer.max_steps=4"], run_dir)
    second = _case("resume", [*common, "trainer.max_steps=6"], run_dir)
    if second["ok"]:
        # log_every=2: a run from scratch would log steps 2, 4, 6; one resumed at step 4 logs only 6
        second["logged_steps"] = [record["step"] for record in second["history"]]
        second["ok"] = second["logged_steps"] == [6] and second["summary"]["final_step"] == 6
    began = time.perf_counter()
    export: dict[str, Any] = {"case": "export"}
    try:
        from transformers import AutoModelForSeq2SeqLM

        from fsdp_kit.checkpoint.export import export_hf

        out = export_hf(run_dir / "checkpoints" / "step_6", work / "export")
        model = AutoModelForSeq2SeqLM.from_pretrained(out)
        export.update(ok=True, params=sum(p.numel() for p in model.parameters()), folder=str(out))
    except Exception as err:
        export.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
    export["seconds"] = time.perf_counter() - began
    print(f"smoke: export: {'ok' if export['ok'] else 'FAILED ' + export['error']}", flush=True)
    return [first, second, export]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("outputs/acceptance"))
    parser.add_argument("--dry", action="store_true", help="CPU: the small grid")
    args = parser.parse_args()
    grid = DRY_GRID if args.dry else GPU_GRID
    began = time.perf_counter()
    cases = [_case(name, overrides, args.work / name) for name, overrides in grid.items()]
    cases += _save_resume_export(args.work, "fp32" if args.dry else "bf16")
    failed = [case["case"] for case in cases if not case["ok"]]
    args.out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        case.pop("history", None)
    (args.out / "smoke.json").write_text(json.dumps(
        {"dry": args.dry, "cuda": torch.cuda.is_available(), "seconds": time.perf_counter() - began,
         "failed": failed, "cases": cases}, indent=1, default=str) + "\n")
    print(f"smoke: {len(cases) - len(failed)}/{len(cases)} ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
