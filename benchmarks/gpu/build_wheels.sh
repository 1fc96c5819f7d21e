#!/usr/bin/env bash
# Build .whl/: the pure-Python dependencies the GPU machine lacks (it has no network), for Python 3.12 there.
# Run here (with network), then carry .whl/ to the GPU machine, where benchmarks/gpu/run.sh installs them with
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`. Pins: pyproject.toml and shared/DESIGN.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PYTHON:-python3}
DEST=${1:-.whl}
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$DEST" \
    hydra-core==1.3.8 omegaconf==2.3.0 submitit==1.5.4 hydra-submitit-launcher==1.2.0
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs) has no wheel on the registry: build one.
"$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
ls -l "$DEST"
