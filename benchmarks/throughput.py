"""Measure training throughput of one recipe on this machine and record it.

    python benchmarks/throughput.py --label t5_3b_bf16_ac model=t5_3b precision=bf16 wrap=transformer ac=full \
        trainer.batch_size=32 --steps 30
    torchrun --nproc_per_node=8 benchmarks/throughput.py --label ... (same overrides)

Synthetic data at the T5 benchmark shape (512 source / 128 target tokens), dropout 0, no eval and no checkpoints;
the first log window (warm-up, compilation) is left out of the summary. Writes
benchmarks/results/<device>/throughput_<label>.json: batch, TFLOPS per GPU (counted model FLOPs / synchronized
step time), MFU, tokens/s, peak memory, with the versions and the command. `fsdp-kit plan` uses these numbers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import compose_job, device_slug, provenance, write_json

from fsdp_kit.train import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    defaults = ["data=synthetic", "model.dropout=0.0", f"trainer.max_steps={args.steps}", "trainer.eval_every=0",
                "trainer.eval_generate=false", "trainer.eval_batches=1", "checkpoint.at_end=false",
                "checkpoint.resume=never", "trainer.warmup_steps=0", f"trainer.log_every={max(args.steps // 3, 1)}",
                f"run_dir=outputs/throughput/{args.label}"]
    job = compose_job([*defaults, *args.overrides])
    result = run(job)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    summary = result.summary
    record = {"label": args.label, "model": job.model.name, "precision": job.precision.name, "wrap": job.wrap.policy,
              "ac": job.ac.mode, "sharding": job.sharding.strategy, "optim": job.optim.name,
              "compile": job.trainer.compile, "batch": job.trainer.batch_size,
              "source_len": job.data.max_source_len, "target_len": job.data.max_target_len,
              "world_size": summary["world_size"], "device": summary["device"],
              "tflops_per_gpu": summary["tflops_per_gpu"], "mfu": summary["mfu"],
              "tokens_per_s": summary["tokens_per_s"], "step_time_s": summary["step_time_s"],
              "peak_mem_gb": summary["peak_mem_gb"], "peak_reserved_gb": summary["peak_reserved_gb"],
              "steps_measured": summary["steps_measured"], "overrides": args.overrides, "provenance": provenance()}
    write_json(args.out / device_slug() / f"throughput_{args.label}.json", record)
    print(record)


if __name__ == "__main__":
    main()
