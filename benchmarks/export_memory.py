"""Peak resident memory of `fsdp-kit export` (a separate process) against the size of the model it exports.

    python benchmarks/export_memory.py model=t5_large                           # this checkout's export
    python benchmarks/export_memory.py --label one_copy_24e5e21 model=t5_large  # run with PYTHONPATH=<older source>

Makes a checkpoint once, in a process of its own (random init, fp32, written by `CheckpointManager.save` as training
writes it, the model's state only: export reads nothing else), then runs `python -m fsdp_kit.cli export` on it and
reads the child's peak RSS from `os.wait4` (this process never holds the model: a child's peak counts its parent's
size at the fork). A PYTHONPATH set by the caller reaches the child: that is how an older export is measured on the
same checkpoint. Writes benchmarks/results/<device>/export_memory_<model>_<label>.json. """

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import compose_job, device_slug, provenance, write_json


class ModelOnly:
    """What ``CheckpointManager.save`` saves, without the optimizer: torch's get_state_dict would give AdamW its
    states (and the model gradients) first, four times the memory, for keys that export never reads."""

    def __init__(self, model) -> None:
        self.model, self.step, self.samples_seen = model, 1, 0

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {"model": get_model_state_dict(self.model)}


def make_checkpoint(run_dir: Path, overrides: list[str]) -> None:
    """Save the model ``overrides`` name as ``run_dir/checkpoints/step_1`` (a committed fsdp_kit checkpoint)."""
    from fsdp_kit import distributed
    from fsdp_kit.checkpoint.manager import CheckpointManager, RunIdentity
    from fsdp_kit.models.build import build as build_model
    from fsdp_kit.models.build import hf_config
    from fsdp_kit.train import shard_and_materialize

    job = compose_job([*overrides, f"run_dir={run_dir}", "checkpoint.resume=never"])
    config = hf_config(job.model)
    model = build_model(job.model, config=config)
    identity = RunIdentity.of(model, config, job.model.name, job.data.tokenizer)
    with distributed.session(distributed.detect(), job.dist, job.sharding) as env:
        shard_and_materialize(model, job, env)
        manager = CheckpointManager(job.checkpoint, run_dir, env.rank, env.world_size, identity)
        manager.save(ModelOnly(model), reason="benchmark")


def measure_export(checkpoint: Path, max_shard_size: str | None) -> dict[str, float]:
    """Run the export in a child process: its peak RSS, wall time and the bytes of safetensors it wrote."""
    with tempfile.TemporaryDirectory(prefix="export_memory_", dir=checkpoint.parent.parent) as scratch:
        out = Path(scratch).resolve() / "hf"
        command = [sys.executable, "-m", "fsdp_kit.cli", "export", str(checkpoint), str(out), "--tokenizer", "byt5"]
        if max_shard_size:
            command += ["--max-shard-size", max_shard_size]
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=scratch)  # not this checkout: `-m` puts the cwd first on sys.path
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"export failed: {' '.join(command)}")
        written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        files = len(list(out.glob("*.safetensors")))
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": seconds, "safetensors_bytes": written,
            "safetensors_files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("outputs/export_memory"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--label", default="streamed")
    parser.add_argument("--max-shard-size", default=None, help="passed to export (default: export's own)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for the next measurement")
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)  # the checkpoint's own process
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    name = "_".join(args.overrides).replace("=", "-").replace("/", "_") or "default"
    run_dir = args.dir / name
    if args.make_only:
        make_checkpoint(run_dir, args.overrides)
        return
    checkpoint = (run_dir / "checkpoints" / "step_1").resolve()
    if not checkpoint.is_dir():
        subprocess.run([sys.executable, __file__, "--make-only", "--dir", str(args.dir), *args.overrides], check=True)
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    record = {"label": args.label, "overrides": args.overrides, "max_shard_size": args.max_shard_size,
              "checkpoint_bytes": checkpoint_bytes, **measure_export(checkpoint, args.max_shard_size),
              "command": " ".join(sys.argv), "pythonpath": os.environ.get("PYTHONPATH", ""),
              "provenance": provenance()}
    if not args.keep:
        shutil.rmtree(run_dir)
    write_json(args.out / device_slug() / f"export_memory_{name}_{args.label}.json", record)
    print({k: v for k, v in record.items() if k != "provenance"})


if __name__ == "__main__":
    main()
