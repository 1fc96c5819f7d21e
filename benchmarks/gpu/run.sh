#!/usr/bin/env bash
# The acceptance command for a bare H100/H200 machine (no network; python3 with torch and transformers there):
#
#   benchmarks/gpu/run.sh            # GPU: install offline, smoke grid, `pytest -m gpu`, `fsdp-kit bench` on T5-3B
#   benchmarks/gpu/run.sh --dry      # CPU: the same steps with the tiny model (part of the CPU test suite)
#   benchmarks/gpu/run.sh --out DIR  # results somewhere else than benchmarks/results/<device>/
#
# The dependencies the GPU machine lacks (hydra-core, omegaconf, antlr4, submitit, hydra-submitit-launcher) come
# as wheels in .whl/ (build them here with `make gpu-wheels`). Every step writes JSON into the results folder
# (and into $OUT/<device>/ when $OUT is set: the device tool returns only $OUT). Every step runs even when an
# earlier one failed; the exit code is 1 when any failed. Budget: 9 minutes on a GPU (BENCH_TIMEOUT_S caps the bench,
# which writes its results after each lever; BENCH_LEVERS=a,b picks levers, e.g. for a second call with the rest).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
DRY=0
OUT_DIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry) DRY=1 ;;
        --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "error: run.sh: unknown argument '$1'. Fix: use --dry and/or --out DIR." >&2; exit 2 ;;
    esac
    shift
done

started=$(date +%s)
# 1. Install offline: the carried wheels into /tmp/site, the project itself through PYTHONPATH.
install="skipped: hydra and submitit already importable"
if ! "$PY" -c "import hydra, omegaconf, submitit, hydra_plugins.hydra_submitit_launcher" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "error: run.sh: hydra-core/omegaconf/submitit are missing and there is no .whl/ folder. Fix: run" \
             "\`make gpu-wheels\` on a machine with network and carry .whl/ along." >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 2
    install="pip install --no-index --no-deps --target /tmp/site $(cd .whl && printf '%s ' ./*.whl)"
fi
export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

DEVICE=$("$PY" -c "import torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; \
print(''.join(c if c.isalnum() else '_' for c in n).strip('_').lower())") || exit 2
if [[ $DRY == 0 && $DEVICE == cpu ]]; then
    echo "error: run.sh: no CUDA device here. Fix: run it on the GPU machine, or pass --dry for the CPU rehearsal." >&2
    exit 2
fi
RESULTS=${OUT_DIR:-benchmarks/results/$DEVICE}
mkdir -p "$RESULTS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fsdp_kit_acceptance.XXXXXX")
failed=()

step() {  # step NAME COMMAND...: run, time, record the exit code; never stop the run
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@"
    local code=$?
    echo "{\"step\": \"$name\", \"exit_code\": $code, \"seconds\": $((SECONDS - t0))}" > "$RESULTS/step_$name.json"
    [[ $code == 0 ]] || failed+=("$name")
}

if [[ $DRY == 1 ]]; then
    SMOKE=(--dry)
    BENCH=(--levers ac --steps 3 data.max_source_len=48 data.max_target_len=8 data.eval_examples=16
           trainer.batch_size=4 trainer.auto_batch_max=8)
    BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-120}
    TESTS=(tests/test_gpu.py)  # where the gpu-marked tests are; collecting the whole suite costs the rehearsal 10 s
else
    SMOKE=()
    BENCH=(--steps 4 model=t5_3b data.max_source_len=512 data.max_target_len=128 data.eval_examples=512)
    BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-300}
    TESTS=(tests)
fi

[[ -n ${BENCH_LEVERS:-} ]] && BENCH+=(--levers "$BENCH_LEVERS")

# 2. The smoke grid, 3. the gpu-marked tests (skipped with their reason on CPU), 4. the bench.
step smoke "$PY" benchmarks/gpu/smoke.py --out "$RESULTS" --work "$WORK/smoke" "${SMOKE[@]}"
step gpu_tests "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$WORK/gpu_tests.xml" "${TESTS[@]}"
"$PY" benchmarks/gpu/junit_to_json.py "$WORK/gpu_tests.xml" "$RESULTS/gpu_tests.json" || failed+=("gpu_tests_report")
step bench timeout "$BENCH_TIMEOUT_S" "$PY" -m fsdp_kit.cli bench --out "$RESULTS" "${BENCH[@]}"

COMMIT=$(git rev-parse HEAD 2>/dev/null || echo "${COMMIT:-unknown}")
"$PY" - "$RESULTS/acceptance.json" "$DRY" "$COMMIT" "$install" "$(( $(date +%s) - started ))" "${failed[@]}" <<'EOF'
import json, platform, sys
import torch, transformers
path, dry, commit, install, seconds, *failed = sys.argv[1:]
json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "dry": dry == "1",
           "commit": commit, "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "python": platform.python_version(), "install": install,
           "command": "benchmarks/gpu/run.sh" + (" --dry" if dry == "1" else ""), "seconds": int(seconds),
           "failed_steps": failed}, open(path, "w"), indent=1)
EOF
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT/$DEVICE" && cp -r "$RESULTS"/. "$OUT/$DEVICE/"
fi
rm -rf "$WORK"
echo "== results in $RESULTS ($(( $(date +%s) - started )) s)${failed[*]:+; FAILED: ${failed[*]}}"
[[ ${#failed[@]} == 0 ]]
