"""Save and load throughput of a sharded checkpoint (torch.distributed.checkpoint), in GB/s.

    python benchmarks/checkpoint_io.py model=t5_3b precision=bf16_pure optim=anyprecision   # on the GPU
    torchrun --nproc_per_node=8 benchmarks/checkpoint_io.py model=t5_3b ...

Builds and shards the model as training does, gives the optimizer its state with one step, then times
`CheckpointManager.save` (write + atomic commit) and `CheckpointManager.restore` into a fresh run. Bytes are the
sizes of the files written. Writes benchmarks/results/<device>/checkpoint_io_<model>.json.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import compose_job, device_slug, provenance, write_json

from fsdp_kit import distributed
from fsdp_kit.checkpoint.manager import CheckpointManager, RunIdentity
from fsdp_kit.checkpoint.state import TrainState
from fsdp_kit.metrics.tracker import synchronize
from fsdp_kit.models.build import build as build_model
from fsdp_kit.models.build import hf_config
from fsdp_kit.optim.build import build_optimizer, build_schedule
from fsdp_kit.policies.precision import param_dtype
from fsdp_kit.train import shard_and_materialize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("outputs/checkpoint_io"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    job = compose_job([*args.overrides, f"run_dir={args.dir}", "checkpoint.resume=never"])
    config = hf_config(job.model)
    model = build_model(job.model, dtype=param_dtype(job.precision), config=config)
    identity = RunIdentity.of(model, config, job.model.name, job.data.tokenizer)
    runtime = distributed.detect()
    with distributed.session(runtime, job.dist, job.sharding) as env:
        shard_and_materialize(model, job, env)
        optimizer = build_optimizer(model, job.optim)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        state = TrainState(model, optimizer, build_schedule(optimizer, job.trainer))
        state.step = 1
        if env.is_main and args.dir.exists():
            shutil.rmtree(args.dir)
        env.barrier()
        manager = CheckpointManager(job.checkpoint, args.dir, env.rank, env.world_size, identity)
        synchronize(env.device)
        start = time.perf_counter()
        path = manager.save(state, reason="benchmark")
        synchronize(env.device)
        save_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        job.checkpoint.resume = str(path)
        reader = CheckpointManager(job.checkpoint, args.dir, env.rank, env.world_size, identity)
        start = time.perf_counter()
        reader.restore(TrainState(model, optimizer, build_schedule(optimizer, job.trainer)))
        synchronize(env.device)
        load_s = time.perf_counter() - start
        if dist.get_rank() == 0:
            record = {"model": job.model.name, "precision": job.precision.name, "optim": job.optim.name,
                      "world_size": env.world_size, "bytes": size, "save_s": save_s, "load_s": load_s,
                      "save_gb_per_s": size / save_s / 1e9, "load_gb_per_s": size / load_s / 1e9,
                      "overrides": args.overrides, "provenance": provenance()}
            write_json(args.out / device_slug() / f"checkpoint_io_{job.model.name}.json", record)
            print(record)


if __name__ == "__main__":
    main()
