"""``fsdp-kit``: one console script for the user's paths, one argparse parser with a subcommand each.

``fsdp-kit train`` hands its arguments to the Hydra app (``python -m fsdp_kit.train``); the other commands take
Hydra overrides too, composed against the same configs. ``--config-dir DIR`` adds a folder of your own configs
(e.g. ``DIR/cluster/mine.yaml``, used as ``cluster=mine``) beside the shipped ones, for every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsdp_kit.bench.levers import LEVERS
from fsdp_kit.errors import ConfigError, FsdpKitError, one_line_warnings, report_error

if TYPE_CHECKING:
    from fsdp_kit.config import TrainConfig

_OVERRIDES_HELP = "Hydra overrides, e.g. model=t5_3b precision=bf16 cluster=p4d cluster.nodes=3"
_CONFIG_DIR_HELP = "a folder of your own configs, searched beside the shipped ones (e.g. DIR/cluster/mine.yaml)"


def _with_config_dir(args: argparse.Namespace) -> list[str]:
    from fsdp_kit.config import search_path_override  # late: `fsdp-kit --help` stays instant

    return ([search_path_override(args.config_dir)] if args.config_dir else []) + list(args.overrides)


def _compose(args: argparse.Namespace) -> tuple[TrainConfig, list[str], dict[str, str]]:
    """The job, the overrides it was composed from and the file each config group came from."""
    from fsdp_kit.config import compose_with_origins  # late: Hydra only for the commands that compose

    overrides = _with_config_dir(args)
    job, found = compose_with_origins(overrides)
    return job, overrides, found


def _train(args: argparse.Namespace) -> int:
    from fsdp_kit import train  # late: each command imports only what it runs
    from fsdp_kit.config import search_path_override  # late: `fsdp-kit --help` stays instant

    if args.config_dir:
        search_path_override(args.config_dir)  # a missing folder: the one line the other commands print
    extra = ["--config-dir", str(Path(args.config_dir).resolve())] if args.config_dir else []
    sys.argv = ["fsdp-kit train", *extra, *args.overrides]
    train.main()
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch  # late: only export needs torch

    from fsdp_kit.checkpoint.export import export_hf
    from fsdp_kit.checkpoint.hf_shards import DEFAULT_MAX_SHARD_SIZE

    out = export_hf(
        args.checkpoint,
        args.out_dir,
        getattr(torch, args.dtype) if args.dtype else None,
        tokenizer=args.tokenizer,
        max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
    )
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def _slurm(args: argparse.Namespace) -> int:
    from fsdp_kit.launch.sbatch import render  # late: each command imports only what it runs
    from fsdp_kit.launch.slurm import check

    job, overrides, _ = _compose(args)
    check(job, local_checks=not args.no_local_checks)
    text = render(job, overrides, render_args=args.argv, file_hint=args.output or "job.sbatch")
    Path(job.slurm.log_dir).mkdir(parents=True, exist_ok=True)  # Slurm does not create the log folder
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}; submit with: sbatch {shlex.quote(args.output)}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from fsdp_kit.launch.slurm import run_dir  # late: submitit only for submit
    from fsdp_kit.launch.submit import submit

    job, cfg = submit(_with_config_dir(args))
    print(f"submitted Slurm job {job.job_id}: {cfg.cluster.nodes} node(s), run dir {run_dir(cfg, job.job_id)}")
    print(f"logs: {job.paths.stdout} (stdout), {job.paths.stderr} (stderr)")
    return 0


def _rehearse(args: argparse.Namespace) -> int:
    import time

    from fsdp_kit.rehearse.report import findings, show
    from fsdp_kit.rehearse.run import Options, rehearse

    job, overrides, _ = _compose(args)
    workdir = Path(args.workdir or f"outputs/rehearse/{time.strftime('%Y%m%d-%H%M%S')}")
    outcome = rehearse(
        job, overrides, Options(workdir, Path(args.slurm_conf) if args.slurm_conf else None, args.edit_hosts)
    )
    rows = findings(outcome)
    show(outcome, rows)
    return 0 if all(row.ok for row in rows) else 1


def _pcluster_check(args: argparse.Namespace) -> int:
    # late: the [aws] extra
    from fsdp_kit.launch.pcluster import check_cluster_yaml, fill_placeholders, read_cluster_file

    bad = [item for item in args.set if "=" not in item]
    if bad:
        raise ConfigError(f"--set {bad[0]!r} is not NAME=VALUE", "pass e.g. --set SUBNET_ID=subnet-0123")
    values = dict(item.split("=", 1) for item in args.set)
    text = fill_placeholders(read_cluster_file(Path(args.file)), values)
    for warning in check_cluster_yaml(text, name=args.file):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.file}: valid for ParallelCluster")
    return 0


PLAN_LENGTHS = (512, 128)
"""Source/target tokens the planner assumes when neither --source-len/--target-len nor data.* says (the blog's)."""


def _plan_lengths(args: argparse.Namespace, overrides: list[str]) -> tuple[int | None, int | None]:
    """--source-len/--target-len, else data.max_source_len/max_target_len or data=PRESET when the overrides name
    them (None: keep the job's), else PLAN_LENGTHS: the built-in task's short defaults are no plan for a real job."""
    named = any(
        item.split("=", 1)[0].lstrip("+~") in ("data", "data.max_source_len", "data.max_target_len")
        for item in overrides
    )
    source = args.source_len if args.source_len is not None else (None if named else PLAN_LENGTHS[0])
    target = args.target_len if args.target_len is not None else (None if named else PLAN_LENGTHS[1])
    for flag, value in (("--source-len", source), ("--target-len", target)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} {value} must be > 0", f"pass e.g. {flag} 512")
    return source, target


def _check_default_lengths(job: TrainConfig) -> None:
    """The planner's default lengths, which the user never set, may not fit a model with a position table
    (gpt2_tiny: 256): then the fix is the planner's flags, not data.* settings."""
    from fsdp_kit.models.build import check_fits, hf_config  # late: transformers only for plan

    config = hf_config(job.model)
    try:
        check_fits(config, job.data, job.trainer.max_new_tokens)
    except ConfigError as err:
        limit = config.max_position_embeddings
        raise ConfigError(
            f"{err.problem}; the planner plans at {PLAN_LENGTHS[0]}/{PLAN_LENGTHS[1]} source/target "
            "tokens unless told otherwise",
            f"pass --source-len/--target-len within its {limit} positions, e.g. --source-len "
            f"{limit - limit // 8} --target-len {limit // 8}",
        ) from err


def _plan(args: argparse.Namespace) -> int:
    if args.top <= 0:
        raise ConfigError(f"--top {args.top} must be > 0", "pass e.g. --top 10")
    source, target = _plan_lengths(args, list(args.overrides))
    job, overrides, found = _compose(args)
    from fsdp_kit.plan import make_plan  # torch and transformers: after the checks that need neither
    from fsdp_kit.plan.report import show, show_search
    from fsdp_kit.plan.search import search

    job = dataclasses.replace(
        job,
        data=dataclasses.replace(
            job.data, max_source_len=source or job.data.max_source_len, max_target_len=target or job.data.max_target_len
        ),
    )
    if (args.source_len is None and source) or (args.target_len is None and target):
        _check_default_lengths(job)
    if args.search:
        recipes, priced = search(job, overrides)
        show_search(
            recipes,
            priced,
            job,
            list(args.overrides),
            top=args.top,
            origins=found,
            config_dir=str(Path(args.config_dir).resolve()) if args.config_dir else None,
        )
    else:
        show(make_plan(job), origins=found)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fsdp_kit.compare import compare  # late: each command imports only what it runs

    try:
        table, png = compare(args.runs, None if args.no_plot else args.plot)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)  # as the plot's folder is
            Path(args.output).write_text(table)
    except OSError as err:  # -o or --plot onto a folder, a file in the way, no permission
        raise ConfigError(
            f"compare could not write {err.filename}: {err.strerror}", "pass -o/--plot a file path in a writable folder"
        ) from err
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(table)
    if png is not None:
        print(f"wrote {png}", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fsdp_kit.bench import levers, probe_factors, run_bench  # late: each command imports only what it runs

    chosen = levers.select([name.strip() for name in args.levers.split(",")] if args.levers else None)
    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps} leaves no step to measure after the first", "pass --steps 2 or more")
    reference = Path(args.reference) if args.reference else _probe_record()
    if args.reference and reference is not None and not reference.is_file():
        raise ConfigError(
            f"--reference {args.reference} does not exist", "pass a gpu_probe_*.json file or leave it out"
        )
    probe_factors(reference)  # a malformed record: refused now, not after the runs
    if args.out:
        _check_bench_out(Path(args.out))
    overrides = _with_config_dir(args)
    from fsdp_kit.bench.report import provenance, write  # torch and transformers: after the checks above

    about = provenance(overrides, args.steps)
    out = (
        Path(args.out)
        if args.out
        else Path("outputs/bench") / "".join(c if c.isalnum() else "_" for c in about["device"]).strip("_").lower()
    )
    if not args.out:
        _check_bench_out(out)
    main_rank = os.environ.get("RANK", "0") == "0"
    results = run_bench(
        chosen, overrides, args.steps, reference, done=(lambda so_far: write(so_far, about, out)) if main_rank else None
    )
    if not main_rank:
        return 0
    paths = write(results, about, out)
    print(paths[1].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _check_bench_out(out: Path) -> None:
    """bench.json, bench.md and bench.png can be written in ``out``: checked before minutes of measuring."""
    from fsdp_kit.bench import OUTPUT_FILES  # late: each command imports only what it runs
    from fsdp_kit.outputs import check_writable_folder

    check_writable_folder(out, "--out")
    for name in OUTPUT_FILES:
        if (out / name).is_dir():
            raise ConfigError(
                f"--out {out}: {out / name} is a folder, where the bench writes a file",
                "pass --out a new folder, or move that folder away",
            )


def _probe_record() -> Path | None:
    """Our GPU probe record, where this is a checkout of the repository (a wheel has no benchmarks/)."""
    found = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "results").glob("gpu_probe_*.json"))
    return found[-1] if found else None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the command, exit code 2 (argparse's own convention)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: Mapping[str, argparse.ArgumentParser] = {}
        """The subcommands' parsers, by name (the top-level parser's)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}. Fix: see `{self.prog} --help`.\n")


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", metavar="DIR", help=_CONFIG_DIR_HELP)
    parser.add_argument("overrides", nargs="*", help=_OVERRIDES_HELP)


def build_parser() -> _Parser:
    parser = _Parser(
        prog="fsdp-kit",
        description=__doc__.splitlines()[0].replace("``", ""),
        epilog="`fsdp-kit COMMAND --help` describes each command.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    parser.commands = commands.choices

    train = commands.add_parser(
        "train",
        help="train (the Hydra app `python -m fsdp_kit.train`)",
        description="Train. Every Hydra option works: --cfg job, -m for sweeps, ...",
        add_help=False,
    )
    train.add_argument("--config-dir", metavar="DIR", help=_CONFIG_DIR_HELP)
    train.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides and options (--help: Hydra's)")
    train.set_defaults(handler=_train)

    export = commands.add_parser(
        "export",
        help="sharded checkpoint -> HF save_pretrained folder",
        description="Write a HF save_pretrained folder from a sharded checkpoint.",
    )
    export.add_argument("checkpoint", help="a complete checkpoint folder, e.g. RUN_DIR/checkpoints/step_500")
    export.add_argument("out_dir", help="new (or empty) output folder")
    export.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="cast the weights (default: as saved)"
    )
    export.add_argument(
        "--tokenizer",
        metavar="NAME_OR_DIR",
        default=None,
        help="save this tokenizer instead of the one the checkpoint records (e.g. where that one "
        "was a relative path, recorded by an older fsdp_kit)",
    )
    export.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        default=None,
        help="largest safetensors file, e.g. 500MB (default 1GB): export holds one file's tensors "
        "in memory at a time, so this bounds its memory, whatever the model's size",
    )
    export.set_defaults(handler=_export)

    slurm = commands.add_parser(
        "slurm",
        help="render a ready sbatch file for the overrides",
        description="Render an sbatch file from Hydra overrides (cluster=p4d "
        "cluster.nodes=3 slurm.partition=... plus training overrides).",
    )
    slurm.add_argument("-o", "--output", help="write here (default: stdout)")
    slurm.add_argument(
        "--no-local-checks",
        action="store_true",
        help="skip checks only this machine can do (data paths, Slurm partitions): for another cluster",
    )
    _add_overrides(slurm)
    slurm.set_defaults(handler=_slurm)

    submit = commands.add_parser(
        "submit",
        help="submit a multi-node job through submitit",
        description="Check, then submit one multi-node Slurm job through submitit "
        "(cluster=..., cluster.nodes=..., slurm.*, training overrides).",
    )
    _add_overrides(submit)
    submit.set_defaults(handler=_submit)

    rehearse = commands.add_parser(
        "rehearse",
        help="run the job scaled down on a local N-node Slurm, with a lost rank and a preemption",
        description="Before renting nodes: render the job as `fsdp-kit slurm` does, scale it down to a tiny model of "
        "the same family (same wrapping, precision, sharding and node layout; processes per node capped "
        "to this machine), run it on a local Slurm of namespaced nodes (root, slurm-wlm, munge), kill one "
        "rank, preempt the job once, and print what held.",
    )
    rehearse.add_argument(
        "--slurm-conf",
        metavar="PATH",
        help="use this running local cluster (partition `nodes`) instead of starting one",
    )
    rehearse.add_argument(
        "--edit-hosts",
        action="store_true",
        help="allow adding the node names to /etc/hosts (removed again at the end); or set FSDP_KIT_EDIT_HOSTS=1",
    )
    rehearse.add_argument(
        "--workdir",
        metavar="DIR",
        help="a new folder for the cluster, job files, run dir and logs (default: outputs/rehearse/<time>)",
    )
    _add_overrides(rehearse)
    rehearse.set_defaults(handler=_rehearse)

    pcluster = commands.add_parser(
        "pcluster-check",
        help="check a ParallelCluster YAML offline (needs [aws])",
        description="Check a ParallelCluster YAML with ParallelCluster's own schema.",
    )
    pcluster.add_argument("file")
    pcluster.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="fill a ${NAME} placeholder (repeatable)"
    )
    pcluster.set_defaults(handler=_pcluster_check)

    plan = commands.add_parser(
        "plan",
        help="per-GPU memory, largest batch and step time for a cluster",
        description="Plan a job before renting GPUs, e.g. model=t5_11b precision=bf16 ac=full "
        "cluster=p4de cluster.nodes=3 trainer.batch_size=8. Plans at "
        "--source-len/--target-len tokens, else at data.max_source_len/"
        "max_target_len when the overrides set them (or data=PRESET), else at "
        f"{PLAN_LENGTHS[0]}/{PLAN_LENGTHS[1]} (the FSDP blog's T5 lengths).",
    )
    plan.add_argument(
        "--search",
        action="store_true",
        help="rank every recipe (precision x sharding x wrap x AC x compile x offload, largest batch "
        "that fits) by predicted tokens/s and print the command for the best",
    )
    plan.add_argument("--top", type=int, default=10, help="with --search: how many recipes to show (default 10)")
    plan.add_argument("--source-len", type=int, default=None, metavar="N", help="source tokens per example")
    plan.add_argument("--target-len", type=int, default=None, metavar="N", help="target tokens per example")
    _add_overrides(plan)
    plan.set_defaults(handler=_plan)

    compare = commands.add_parser(
        "compare",
        help="several runs side by side: a markdown table and a PNG",
        description="Compare runs (e.g. a Hydra sweep): final and eval loss, exact match, "
        "TFLOPS, tokens/s, peak memory and the config keys that differ, "
        "plus loss and throughput curves.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs, or folders of them (a multirun dir)")
    compare.add_argument("-o", "--output", help="write the markdown table here (default: stdout)")
    compare.add_argument("--plot", default="compare.png", help="the PNG of curves (default: compare.png)")
    compare.add_argument("--no-plot", action="store_true", help="only the table")
    compare.set_defaults(handler=_compare)

    bench = commands.add_parser(
        "bench",
        help="the FSDP T5 blog's ablation on this hardware: each lever off vs on",
        description="For each speed lever (precision, AC, wrap, compile, ...) off and on: "
        "find the largest batch, measure TFLOPS and tokens/s there, print the "
        "gain beside the published factor. Writes bench.json, bench.md, bench.png.",
    )
    bench.add_argument(
        "--levers", metavar="A,B", help=f"levers to run (default: all): {', '.join(lever.name for lever in LEVERS)}"
    )
    bench.add_argument(
        "--steps",
        type=int,
        default=6,
        help="training steps per run (the first log window is left out of the numbers; default 6)",
    )
    bench.add_argument("--out", metavar="DIR", help="where the results go (default: outputs/bench/<device>)")
    bench.add_argument(
        "--reference",
        metavar="JSON",
        help="our GPU probe record to compare with (default: benchmarks/results/gpu_probe_*.json of this checkout)",
    )
    _add_overrides(bench)
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    one_line_warnings()
    parser = build_parser()
    if argv[:1] == ["train"]:
        # Hydra parses train's options itself (--cfg, -m, --help): only pull out our --config-dir.
        args = argparse.Namespace(config_dir=None, overrides=argv[1:], handler=_train, argv=argv[1:])
        if "--config-dir" in args.overrides:
            at = args.overrides.index("--config-dir")
            if at + 1 == len(args.overrides):  # not silently dropped: that would train without the user's configs
                return report_error(
                    ConfigError(
                        "fsdp-kit train --config-dir names no folder",
                        "pass --config-dir DIR, a folder holding e.g. cluster/mine.yaml",
                    )
                )
            args.config_dir = args.overrides[at + 1]
            args.overrides = args.overrides[:at] + args.overrides[at + 2 :]
    elif argv[:1] and argv[0] in parser.commands:
        # Overrides anywhere on the line (`plan cluster=h100 --search model=t5_3b`): argparse's plain parse stops
        # the positionals at the first option and calls the rest unrecognized.
        args = parser.commands[argv[0]].parse_intermixed_args(argv[1:])
        args.argv = argv[1:]
    else:
        args = parser.parse_args(argv)
        args.argv = argv[1:]
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except FsdpKitError as err:
        return report_error(err)


if __name__ == "__main__":
    sys.exit(main())
