"""``fsdp-kit``: one console script for the user's paths.

  fsdp-kit train [hydra overrides]          train (the Hydra app ``python -m fsdp_kit.train``)
  fsdp-kit export CHECKPOINT OUT_DIR        sharded checkpoint -> HF save_pretrained folder
  fsdp-kit slurm [-o FILE] [overrides]      render a ready sbatch file for the overrides
  fsdp-kit submit [overrides]               submit a multi-node job through submitit
  fsdp-kit pcluster-check FILE [--set K=V]  check a ParallelCluster YAML offline (needs the [aws] extra)
  fsdp-kit plan [overrides]                 per-GPU memory, largest batch and step time for a cluster
"""

from __future__ import annotations

import argparse
import sys

from fsdp_kit.errors import ConfigError, FsdpKitError


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fsdp-kit export",
                                     description="Write a HF save_pretrained folder from a sharded checkpoint.")
    parser.add_argument("checkpoint", help="a complete checkpoint folder, e.g. RUN_DIR/checkpoints/step_500")
    parser.add_argument("out_dir", help="new (or empty) output folder")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast the weights (default: as saved)")
    args = parser.parse_args(argv)
    import torch

    from fsdp_kit.checkpoint.export import export_hf

    out = export_hf(args.checkpoint, args.out_dir, getattr(torch, args.dtype) if args.dtype else None)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def _slurm(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fsdp-kit slurm", description="Render an sbatch file from Hydra overrides "
                                     "(cluster=p4d cluster.nodes=3 slurm.partition=... plus training overrides).")
    parser.add_argument("-o", "--output", help="write here (default: stdout)")
    parser.add_argument("--no-local-checks", action="store_true",
                        help="skip checks only this machine can do (data paths, Slurm partitions): for another cluster")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    import shlex
    from pathlib import Path

    from fsdp_kit.launch.sbatch import render
    from fsdp_kit.launch.slurm import check, compose_job

    job = compose_job(args.overrides)
    check(job, local_checks=not args.no_local_checks)
    text = render(job, args.overrides, render_args=argv,
                  file_hint=args.output or "job.sbatch")
    Path(job.slurm.log_dir).mkdir(parents=True, exist_ok=True)  # Slurm does not create the log folder
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; submit with: sbatch {shlex.quote(args.output)}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _submit(argv: list[str]) -> int:
    from fsdp_kit.launch.submit import submit

    if argv and argv[0] in ("-h", "--help"):
        print("usage: fsdp-kit submit [hydra overrides]  (cluster=..., cluster.nodes=..., slurm.*, training overrides)")
        return 0
    from fsdp_kit.launch.slurm import run_dir

    job, cfg = submit(argv)
    print(f"submitted Slurm job {job.job_id}: {cfg.cluster.nodes} node(s), run dir {run_dir(cfg, job.job_id)}")
    print(f"logs: {job.paths.stdout} (stdout), {job.paths.stderr} (stderr)")
    return 0


def _pcluster_check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fsdp-kit pcluster-check",
                                     description="Check a ParallelCluster YAML with ParallelCluster's own schema.")
    parser.add_argument("file")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="fill a ${NAME} placeholder (repeatable)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from fsdp_kit.launch.pcluster import check_cluster_yaml, fill_placeholders

    bad = [item for item in args.set if "=" not in item]
    if bad:
        raise ConfigError(f"--set {bad[0]!r} is not NAME=VALUE", "pass e.g. --set SUBNET_ID=subnet-0123")
    if not Path(args.file).is_file():
        raise ConfigError(f"{args.file} does not exist", "pass the path of a ParallelCluster YAML file")
    values = dict(item.split("=", 1) for item in args.set)
    warnings = check_cluster_yaml(fill_placeholders(Path(args.file).read_text(), values))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: valid for ParallelCluster")
    return 0


def _plan(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: fsdp-kit plan [hydra overrides]   e.g. model=t5_11b precision=bf16 ac=full cluster=p4de "
              "cluster.nodes=3 trainer.batch_size=8")
        return 0
    from fsdp_kit.launch.slurm import compose_job
    from fsdp_kit.plan import make_plan
    from fsdp_kit.plan.report import show

    show(make_plan(compose_job(argv)))
    return 0


def _train(argv: list[str]) -> int:
    from fsdp_kit import train

    sys.argv = ["fsdp-kit train", *argv]
    train.main()
    return 0


COMMANDS = {"train": _train, "export": _export, "slurm": _slurm, "submit": _submit,
            "pcluster-check": _pcluster_check, "plan": _plan}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except FsdpKitError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
