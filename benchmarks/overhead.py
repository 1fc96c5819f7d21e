"""Framework overhead: the same model, batch and shapes through a plain FSDP2 loop and through fsdp_kit's trainer.

    python benchmarks/overhead.py --model t5_tiny --batch 8 --source-len 64 --target-len 16
    python benchmarks/overhead.py --model t5_small --batch 8 --source-len 128 --target-len 32 --steps 40

Two ranks on CPU (gloo, one thread each), started here. In each rank both loops run in turn, ``--repeats`` times,
in alternating order so that a busy machine slows both alike. The plain loop is what a user writes by hand:
``fully_shard`` per T5 block and on the root, torch AdamW, ``model(**batch).loss.backward()``, nothing else; it
reads the same synthetic batches through the same DataLoader. The fsdp_kit side is ``fsdp_kit.train.run`` on
a job with the same model, batch and lengths (no gradient clipping, like the plain loop, unless ``--clip``).

Per-step time: a timestamp at the end of each optimizer step (for fsdp_kit, when the fit loop reports the step
to its Reporter), then (t[warmup + steps] - t[warmup]) / steps, so start-up, the first steps and the final eval
are left out; log steps inside the window (every ``--log-every``) are counted. The median of the single step
durations is recorded too: on a machine shared with other work it is the steadier of the two. The ratio is
fsdp_kit / plain of the same repeat; the summary gives the median and the range over repeats. Writes
benchmarks/results/<device>/overhead_<model>_b<batch>_<src>x<tgt>.json with the command that made it.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from common import compose_job, device_slug, provenance, write_json

import fsdp_kit

WORLD = 2


def _job_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [f"model={args.model}", "model.dropout=0.0", "data=synthetic", f"data.max_source_len={args.source_len}",
            f"data.max_target_len={args.target_len}", f"data.num_examples={max(4096, 4 * args.batch * WORLD)}",
            f"data.eval_examples={args.batch * WORLD}", f"trainer.batch_size={args.batch}",
            f"trainer.max_steps={args.warmup + args.steps}", f"trainer.log_every={args.log_every}",
            "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.eval_generate=false",
            f"trainer.clip_grad_norm={1.0 if args.clip else 'null'}", "checkpoint.at_end=false",
            "checkpoint.resume=never", "metrics.progress=false", f"run_dir={run_dir}"]


def _plain(args: argparse.Namespace) -> list[float]:
    """The hand-written FSDP2 loop; returns a timestamp after each optimizer step."""
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForSeq2SeqLM

    from fsdp_kit.data.loader import build as build_data
    from fsdp_kit.models.build import hf_config

    job = compose_job(_job_overrides(args, tempfile.mkdtemp()))
    config = hf_config(job.model)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config)
    for block in [*model.encoder.block, *model.decoder.block]:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.optim.lr, weight_decay=job.optim.weight_decay)
    loader = build_data(job.data, config).train_loader(args.batch, dist.get_rank(), dist.get_world_size())
    batches = iter(loader)
    model.train()
    stamps = []
    for _ in range(args.warmup + args.steps):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


def _fsdp_kit(args: argparse.Namespace) -> list[float]:
    """``fsdp_kit.train.run`` on the same job; the fit loop reports every finished step to its Reporter, whose
    ``advance`` is wrapped here to take the timestamp (nothing else is changed)."""
    from fsdp_kit.metrics.report import Reporter
    from fsdp_kit.train import run

    stamps: list[float] = []
    original = Reporter.advance

    def stamped(self: Reporter, step: int) -> None:
        stamps.append(time.perf_counter())
        original(self, step)

    Reporter.advance = stamped
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            run(compose_job(_job_overrides(args, run_dir)))
    finally:
        Reporter.advance = original
    return stamps


def _per_step(stamps: list[float], warmup: int, steps: int) -> tuple[float, float]:
    """(mean, median) seconds per step over the timed window. The mean counts everything, log steps
    included; the median is robust to other processes taking the cores for a while."""
    if len(stamps) != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} step timestamps, got {len(stamps)}")
    window = stamps[warmup - 1:]
    return (window[-1] - window[0]) / steps, statistics.median(b - a for a, b in itertools.pairwise(window))


def _rank(rank: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        rows = []
        for repeat in range(args.repeats):
            order = ("plain", "fsdp_kit") if repeat % 2 == 0 else ("fsdp_kit", "plain")
            row: dict[str, Any] = {"repeat": repeat, "order": list(order)}
            for name in order:
                dist.barrier()
                stamps = _plain(args) if name == "plain" else _fsdp_kit(args)
                row[f"{name}_step_s"], row[f"{name}_median_step_s"] = _per_step(stamps, args.warmup, args.steps)
            row["ratio"] = row["fsdp_kit_step_s"] / row["plain_step_s"]
            row["ratio_of_medians"] = row["fsdp_kit_median_step_s"] / row["plain_median_step_s"]
            rows.append(row)
            if rank == 0:
                print(f"repeat {repeat}: plain {row['plain_step_s'] * 1e3:.1f} ms, fsdp_kit "
                      f"{row['fsdp_kit_step_s'] * 1e3:.1f} ms, ratio {row['ratio']:.3f} "
                      f"(of step medians {row['ratio_of_medians']:.3f})", flush=True)
        dist.destroy_process_group()
        queue.put((rank, "ok", rows))
    except BaseException as err:  # the parent reports it
        queue.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5_tiny")
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--source-len", type=int, default=64)
    parser.add_argument("--target-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="timed steps, after --warmup")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=10, help="fsdp_kit's trainer.log_every")
    parser.add_argument("--clip", action="store_true", help="clip the gradient norm to 1.0 in both loops")
    parser.add_argument("--tag", default="", help="appended to the result file name (e.g. before)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")

    ctx = mp.get_context("spawn")  # fresh interpreters: nothing inherited from this one's torch state
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(rank, port, args, queue)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    results = dict((rank, (status, payload)) for rank, status, payload in (queue.get() for _ in procs))
    for proc in procs:
        proc.join()
    errors = [payload for status, payload in results.values() if status != "ok"]
    if errors:
        raise SystemExit("a rank failed:\n" + "\n".join(errors))

    rows = results[0][1]
    ratios = [row["ratio"] for row in rows]
    plain = [row["plain_step_s"] for row in rows]
    ours = [row["fsdp_kit_step_s"] for row in rows]
    record = {
        "model": args.model, "batch_per_rank": args.batch, "source_len": args.source_len,
        "target_len": args.target_len, "world_size": WORLD, "threads_per_rank": 1, "backend": "gloo",
        "fsdp_kit_source": str(Path(fsdp_kit.__file__).resolve().parent),
        "timed_steps": args.steps, "warmup_steps": args.warmup, "log_every": args.log_every, "clip": args.clip,
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ratio_of_step_medians": [row["ratio_of_medians"] for row in rows],
        "plain_step_ms_median": 1e3 * statistics.median(plain),
        "fsdp_kit_step_ms_median": 1e3 * statistics.median(ours),
        "extra_ms_per_step_median": 1e3 * statistics.median(o - p for o, p in zip(ours, plain)),
        "repeats": rows, "load_avg_at_end": list(os.getloadavg()), "provenance": provenance(),
    }
    tag = f"_{args.tag}" if args.tag else ""
    name = f"overhead_{args.model}_b{args.batch}_{args.source_len}x{args.target_len}{tag}.json"
    write_json(args.out / device_slug() / name, record)
    print({k: v for k, v in record.items() if k not in ("repeats", "provenance")})


if __name__ == "__main__":
    main()
