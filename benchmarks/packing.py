"""Padding share and tokens of text per second, packed (data.packing=true) vs one pair per row, on a generated
wikihow-shaped CSV (long sources, short targets; nothing downloaded).

    python benchmarks/packing.py [--rows 3000] [--steps 20] [overrides...]

The CSV: sources of a log-normal number of words (median ``--source-words``, sigma 0.8, so many articles are shorter
than max_source_len and some are cut), targets of 4 to 16 words, both from a fixed word list. Padding is counted over
the first ``--batches`` training batches of each layout (source and target sides together); throughput is the run
summary's ``real_tokens_per_s`` (source and target tokens that are not padding) of a short training run on this
machine (wall clock: on a shared machine it swings with the load), and the same tokens per CPU second of this
process over a plain loop (loading, forward, backward, AdamW), the steadier number. Rounds interleave the layouts;
medians are kept. Writes ``results/<device>/packing.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import compose_job, device_slug, provenance, write_json

WORDS = ("the", "water", "place", "make", "sure", "your", "cut", "paper", "into", "small", "pieces", "before", "you",
         "start", "mix", "them", "with", "glue", "then", "let", "it", "dry", "for", "an", "hour", "and", "paint")


def write_csv(path: Path, rows: int, source_words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["headline", "title", "text"])
        for _ in range(rows):
            length = max(3, int(rng.lognormvariate(0.0, 0.8) * source_words))
            text = " ".join(rng.choice(WORDS) for _ in range(length))
            headline = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
            writer.writerow([headline, "how to", text])


def padding(overrides: list[str], batches: int, batch_size: int) -> dict[str, float]:
    """Shares of padding (source side, target side, both) over the first ``batches`` batches, and pairs per row."""
    from fsdp_kit import data, models
    from fsdp_kit.data.packing import take_stream_pairs
    from fsdp_kit.models.objective import IGNORE_INDEX

    job = compose_job(overrides)
    bundle = data.build(job.data, models.hf_config(job.model))
    loader = iter(bundle.train_loader(batch_size, rank=0, world_size=1))
    counts = dict.fromkeys(("source_real", "source_all", "target_real", "target_all", "pairs"), 0)
    for _ in range(batches):
        batch = next(loader)
        counts["pairs"] += take_stream_pairs(batch) or batch_size
        counts["source_real"] += int(batch["attention_mask"].sum())
        counts["source_all"] += batch["input_ids"].numel()
        counts["target_real"] += int((batch["labels"] != IGNORE_INDEX).sum())
        counts["target_all"] += batch["labels"].numel()
    real, total = counts["source_real"] + counts["target_real"], counts["source_all"] + counts["target_all"]
    return {"padding_share": 1 - real / total, "source_padding_share": 1 - counts["source_real"] / counts["source_all"],
            "target_padding_share": 1 - counts["target_real"] / counts["target_all"],
            "pairs_per_row": counts["pairs"] / (batches * batch_size)}


def throughput(overrides: list[str], run_dir: str, steps: int) -> float:
    from rich.console import Console

    from fsdp_kit.train import run

    job = compose_job([*overrides, f"run_dir={run_dir}", f"trainer.max_steps={steps}",
                       f"trainer.log_every={max(steps // 4, 1)}", "trainer.eval_every=0", "trainer.eval_generate=false",
                       "trainer.eval_batches=1", "checkpoint.at_end=false", "metrics.progress=false"])
    return run(job, console=Console(file=io.StringIO())).summary["real_tokens_per_s"]


def cpu_throughput(overrides: list[str], steps: int, batch_size: int) -> float:
    """Tokens of text per CPU second of this process (loading, forward, backward, AdamW step): unlike wall time, it
    barely moves with the load of a shared machine. One thread (set OMP_NUM_THREADS=1)."""
    import torch

    from fsdp_kit import data, models
    from fsdp_kit.data.packing import take_stream_pairs
    from fsdp_kit.models.objective import IGNORE_INDEX, token_loss

    job = compose_job(overrides)
    config = models.hf_config(job.model)
    bundle = data.build(job.data, config)
    torch.manual_seed(0)
    model = models.build(job.model, device="cpu", config=config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = iter(bundle.train_loader(batch_size, rank=0, world_size=1))
    text = 0
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            began, text = time.process_time(), 0
        batch = next(loader)
        take_stream_pairs(batch)
        text += int(batch["attention_mask"].sum()) + int((batch["labels"] != IGNORE_INDEX).sum())
        loss_sum, tokens = token_loss(model, batch)
        (loss_sum / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return text / (time.process_time() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--source-words", type=int, default=50)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median is kept)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fsdp_kit_packing_") as scratch:
        path = Path(scratch) / "wikihow_shaped.csv"
        write_csv(path, args.rows, args.source_words)
        base = ["data=csv", f"data.path={path}", f"trainer.batch_size={args.batch_size}", *args.overrides]
        layouts = {"padded_to_max": ["data.pad_to_max_length=true"],
                   "padded_to_longest": ["data.pad_to_max_length=false"],
                   "packed_to_max": ["data.packing=true", "data.pad_to_max_length=true"],
                   "packed_to_longest": ["data.packing=true", "data.pad_to_max_length=false"]}
        for name, extra in layouts.items():
            results[name] = {**padding([*base, *extra], args.batches, args.batch_size), "real_tokens_per_s_runs": [],
                             "real_tokens_per_cpu_s_runs": []}
        # Rounds interleave the layouts, so that a change in this shared machine's load hits them all alike.
        for round_ in range(args.rounds):
            for name, extra in layouts.items():
                rate = throughput([*base, *extra], f"{scratch}/{name}_{round_}", args.steps)
                cpu_rate = cpu_throughput([*base, *extra], args.steps, args.batch_size)
                results[name]["real_tokens_per_s_runs"].append(rate)
                results[name]["real_tokens_per_cpu_s_runs"].append(cpu_rate)
                print(f"round {round_}: {name} {rate:,.0f} tokens of text/s (wall), {cpu_rate:,.0f} per CPU s",
                      flush=True)
        for numbers in results.values():
            numbers["real_tokens_per_s"] = statistics.median(numbers["real_tokens_per_s_runs"])
            numbers["real_tokens_per_cpu_s"] = statistics.median(numbers["real_tokens_per_cpu_s_runs"])
    print(json.dumps(results, indent=1))
    out = Path(__file__).parent / "results" / device_slug() / "packing.json"
    write_json(out, {"provenance": provenance(), "settings": vars(args), "load_average": os.getloadavg(),
                     "layouts": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
