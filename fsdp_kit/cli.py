"""``fsdp-kit``: one console script for the user's paths.

  fsdp-kit train [hydra overrides]          train (the Hydra app ``python -m fsdp_kit.train``)
  fsdp-kit export CHECKPOINT OUT_DIR        sharded checkpoint -> HF save_pretrained folder
"""

from __future__ import annotations

import argparse
import sys

from fsdp_kit.errors import FsdpKitError


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


def _train(argv: list[str]) -> int:
    from fsdp_kit import train

    sys.argv = ["fsdp-kit train", *argv]
    train.main()
    return 0


COMMANDS = {"train": _train, "export": _export}


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
