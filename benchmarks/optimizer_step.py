"""Time one optimizer step on a model's parameters: AnyPrecisionAdamW (Kahan, bf16 states) vs torch AdamW.

    python benchmarks/optimizer_step.py --model t5_3b          # on the GPU: parameters in bf16, fused AdamW
    python benchmarks/optimizer_step.py --model t5_small       # CPU check of the script
    python benchmarks/optimizer_step.py --model t5_11b --chunk-elements 33554432 134217728 536870912

Parameters are allocated as in pure-bf16 training and given random gradients; each optimizer takes warm-up steps,
then the median of timed steps (CUDA-synchronized) is reported. Writes
benchmarks/results/<device>/optimizer_step_<model>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import compose_job, device_slug, provenance, write_json

from fsdp_kit.models.build import build as build_model
from fsdp_kit.optim.anyprecision import CHUNK_NUMEL, AnyPrecisionAdamW


def _time_steps(optimizer: torch.optim.Optimizer, device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5_3b")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chunk-elements", type=int, nargs="+", default=[CHUNK_NUMEL],
                        help="AnyPrecisionAdamW elements per multi-tensor call; several values are each timed")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = compose_job([f"model={args.model}"]).model
    results = {}
    # The first --chunk-elements value keeps the plain name (and the ratio); others are suffixed.
    runs = [("anyprecision_kahan_bf16" if i == 0 else f"anyprecision_kahan_bf16_chunk{chunk}", chunk)
            for i, chunk in enumerate(args.chunk_elements)] + [("torch_adamw", None)]
    for name, chunk in runs:
        model = build_model(cfg, device=device, dtype=torch.bfloat16)
        params = [p for p in model.parameters()]
        generator = torch.Generator(device=device).manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype) * 1e-3
        if name == "torch_adamw":
            optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda",
                                          foreach=None if device.type == "cuda" else True)
        else:
            optimizer = AnyPrecisionAdamW(params, lr=1e-4, use_kahan_summation=True, momentum_dtype=torch.bfloat16,
                                          variance_dtype=torch.bfloat16, compensation_buffer_dtype=torch.bfloat16,
                                          chunk_elements=chunk)
        results[name] = _time_steps(optimizer, device, args.warmup, args.steps)
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        results[f"{name}_peak_gb"] = peak
        del optimizer, model, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    ratio = results["anyprecision_kahan_bf16"] / results["torch_adamw"]
    record = {"model": args.model, "params": sum(p.numel() for p in build_model(cfg).parameters()),
              "chunk_elements": args.chunk_elements,
              "step_s": results, "ratio_anyprecision_vs_adamw": ratio, "target_ratio": 1.3,
              "provenance": provenance()}
    write_json(args.out / device_slug() / f"optimizer_step_{args.model}.json", record)
    print(record)


if __name__ == "__main__":
    main()
