#!/usr/bin/env bash
# Everything a borrowed GPU machine should run, in one go, into one results folder:
#
#   benchmarks/gpu_suite.sh [RESULTS_DIR]
#
# RESULTS_DIR defaults to benchmarks/results/<date>-<gpu name from nvidia-smi>, the
# folder layout the README promises for committed results. Steps (each one's output
# goes to RESULTS_DIR/logs/<step>.log; a failed step does not stop the next):
#   environment  nvidia-smi, python, torch, triton versions
#   pytest       the tests that exercise CUDA or real (not interpreted) Triton, with
#                TRITON_INTERPRET=0; tests/conftest.py keeps that explicit 0
#   report       python -m fastdetr.kernels.report (ahead-of-time compile, registers, spills)
#   memory       python -m fastdetr.memory (saved-for-backward bytes at DETR-R50 shapes)
#   benchmarks   benchmarks/run.py: ceilings, ops, attention, layers, model, matcher
#                -> RESULTS_DIR/results.{csv,md} and RESULTS_DIR/plots/ (GPU_SUITE_QUICK=1: --quick)
# The convergence benchmark (benchmarks/convergence.py --out DIR: two ~5-minute bf16 trainings) is not
# here: it alone would break this suite's 8-minute budget; a GPU session with time to spare runs it after.
# The CPU proxies are not run here: they mean the same on any machine and run in `make test`.
# Exits 1 when any step failed (RESULTS_DIR/summary.txt says which), else 0.
# PYTHON overrides the interpreter (default: .venv/bin/python when present, else python).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

# The tests that mean something on a GPU: tests/test_gpu.py checks every fused op, layer and a
# whole optimized DETR-R50 on CUDA at DETR's shapes. The kernel tests (tests/test_*_kernel.py)
# build CPU tensors for Triton's interpreter, so they are not here; a test file that learns to
# run on CUDA tensors is added to this list.
GPU_TESTS=(
    tests/test_gpu.py
    tests/test_memory.py
    tests/test_benchmarks_layers.py
    tests/test_kernel_report.py
)

if command -v nvidia-smi >/dev/null 2>&1; then
    gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
fi
# "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"
gpu_slug="$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')"
results="${1:-benchmarks/results/$(date +%F)-${gpu_slug:-no-gpu}}"
mkdir -p "$results/logs" || exit 2
results="$(cd "$results" && pwd)"
summary="$results/summary.txt"
: > "$summary"
failed=()

# run_step NAME COMMAND...: runs COMMAND, its stdout and stderr into logs/NAME.log, and
# records the outcome; never stops the suite.
run_step() {
    local name="$1"
    shift
    local log="$results/logs/$name.log"
    local start=$SECONDS
    echo "== $name: $*"
    { echo "\$ $*"; echo; } > "$log"
    "$@" >> "$log" 2>&1
    local status=$?
    local line
    line="$(printf '%-12s %-6s %5ds  %s' "$name" "$([[ $status -eq 0 ]] && echo ok || echo FAILED)" \
        "$((SECONDS - start))" "logs/$name.log")"
    echo "$line" | tee -a "$summary"
    if [[ $status -ne 0 ]]; then
        failed+=("$name")
        tail -n 20 "$log" | sed 's/^/    /'
    fi
}

environment() {
    nvidia-smi || echo "nvidia-smi failed or is missing: not a GPU machine?"
    "$PYTHON" - <<'PY'
import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__)
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no device")
PY
}

export TRITON_INTERPRET=0
run_step environment environment
run_step pytest "$PYTHON" -m pytest -q -ra "${GPU_TESTS[@]}"
run_step report "$PYTHON" -m fastdetr.kernels.report --json "$results/kernel_report.json"
run_step memory "$PYTHON" -m fastdetr.memory --device cuda
quick=()
if [[ "${GPU_SUITE_QUICK:-0}" == "1" ]]; then quick=(--quick); fi
run_step benchmarks "$PYTHON" benchmarks/run.py "${quick[@]}" --suites ceiling ops attention layers model matcher \
    --out "$results"

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed: ${failed[*]} (see $summary)"
    exit 1
fi
echo "all steps passed; results in $results"
