#!/usr/bin/env bash
# Everything a borrowed GPU machine should run, in one go, into one results folder and one archive:
#
#   benchmarks/gpu_suite.sh [--archive FILE.tgz] [--budget SECONDS] [--full | --smoke] [RESULTS_DIR]
#
# RESULTS_DIR defaults to benchmarks/results/<date>-<gpu name from nvidia-smi> (a "-2", "-3" ... suffix when
# that exists), the layout the README promises for committed results; a RESULTS_DIR given must be absent or
# empty. Each step runs under `timeout` (TERM at its limit, KILL 10 s later), its stdout and stderr into
# RESULTS_DIR/logs/<step>.log; a step that fails or times out is recorded and the next one runs. After every
# step RESULTS_DIR/summary.txt has one more line and --archive FILE (a .tgz of RESULTS_DIR) is rewritten, and
# once more on exit, whatever stopped the suite: a run killed from outside keeps the archive of its last step.
#
# Steps, most valuable first, with their time limits in seconds (--full: 4x the limits and budget):
#   environment       15  nvidia-smi; python, torch, triton, CUDA; where fastdetr is imported from
#   bench-ceiling     20  benchmarks/run.py --quick --suites ceiling   (bf16 matmul TFLOP/s, copy GB/s)
#   bench-ops         45    ... ops        (each GEMM-epilogue kernel vs eager)
#   bench-attention   40    ... attention  (flash attention vs SDPA vs nn.MultiheadAttention)
#   bench-layers      45    ... layers     (the 6+6-layer transformer, reference vs fastdetr)
#   bench-model      150    ... model      (DETR-R50 inference and training step, batch 2; the static-shape case:
#                         CUDA graphs vs eager at DETR's augmentation sizes, training at batch 2, inference at 1;
#                         Deformable-DETR-R50 at 800x1333, inference at batch 1, training at 2, fp32 and bf16)
#   bench-matcher     20    ... matcher    (a training step's matching, DETR scale)
#   bench-deformable_attention
#                     50    ... deformable_attention  (MSDA op and module, fused and unfused, vs grid_sample and,
#                         where it imports, the CUDA op; --quick: the Deformable-DETR encoder and the RT-DETR decoder)
#                         each adds its rows to RESULTS_DIR/results.csv, redraws results.md and headline.txt,
#                         draws its plots/
#   pytest           140  the GPU correctness tests (GPU_TESTS below), TRITON_INTERPRET=0, with pytest-timeout's
#                         --timeout 120 per test where installed; junit XML in RESULTS_DIR/pytest.xml
#   convergence      <=200  benchmarks/convergence.py --short: reference vs fused training, same seed and
#                         batches, no dropout; each training gets a third of (limit - 50 s), the limit being
#                         what the budget has left, at most 200 s -> RESULTS_DIR/convergence/
#   memory            45  python -m fastdetr.memory --device cuda (saved-for-backward bytes, DETR-R50 shapes)
#   report            60  python -m fastdetr.kernels.report (ahead-of-time compiles; the same as CI's)
# The whole suite stays within --budget (default 450 s; the bench steps and pytest take 525 s at most): a
# step gets min(its limit, what is left), and is recorded as "skipped" when under 15 s are left. The Triton
# JIT compiles inside each step's limit (its cache, ~/.triton/cache, carries over from step to step).
# The full convergence benchmark (two ~5-minute trainings) and torch.compile's providers (--full) need a
# session of their own. The CPU proxies are not run: they mean the same on any machine and run in make test.
#
# --smoke is the dry run `make test` does (tests/test_gpu_suite.py), on a CPU: the same steps at tiny shapes
# through Triton's interpreter (TRITON_INTERPRET=1, FASTDETR_GPU_TESTS_ON_CPU=1) -- the seven bench steps as one
# `bench` step (one process), one of the GPU tests, convergence.py --cpu-check for one step.
#
# PYTHON overrides the interpreter (default: .venv/bin/python when present, else python3, else python). The
# tree is imported from source whatever is installed: the repository root and benchmarks/source_tree (a
# sitecustomize that maps fastdetr.kernels to kernels/) go first on PYTHONPATH, so a machine with torch and
# Triton but no fastdetr install, no setuptools and no network runs it as it is.
# Exits 0 when every step that ran passed, 1 when one failed or timed out, 2 on a bad command line, 130 / 143
# when stopped by INT / TERM (the running step is then ended and recorded as STOPPED, and the archive packed).
set -uo pipefail

usage() { sed -n '2,4p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,3\}//'; }

archive="" budget="" mode=quick results=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --archive) archive="${2:?--archive needs a file}"; shift 2 ;;
        --archive=*) archive="${1#*=}"; shift ;;
        --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
        --budget=*) budget="${1#*=}"; shift ;;
        --full) mode=full; shift ;;
        --smoke) mode=smoke; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_suite.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) [[ -z "$results" ]] || { echo "gpu_suite.sh: one RESULTS_DIR only" >&2; exit 2; }; results="$1"; shift ;;
    esac
done
scale=1
if [[ "$mode" == full ]]; then scale=4; fi
budget="${budget:-$((450 * scale))}"
# --smoke: the same budget, 3x the limits (the interpreter on a busy CI machine; the steps take seconds)
if [[ "$mode" == smoke ]]; then scale=3; fi
if ! [[ "$budget" =~ ^[0-9]+$ ]]; then echo "gpu_suite.sh: --budget takes whole seconds" >&2; exit 2; fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
invoked_from="$PWD"
cd "$repo" || exit 2
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$invoked_from" "$1" ;; esac; }
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
    elif command -v python3 >/dev/null 2>&1; then PYTHON=python3
    else PYTHON=python; fi
fi
export PYTHON
export PYTHONPATH="$repo/benchmarks/source_tree:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1   # a step killed at its limit still leaves its output in its log

if command -v nvidia-smi >/dev/null 2>&1; then
    gpu_name="$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
fi
# "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"
gpu_slug="$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')"
if [[ -z "$results" ]]; then
    results="benchmarks/results/$(date +%F)-${gpu_slug:-no-gpu}"
    base="$results" n=2
    while [[ -e "$results" ]]; do results="$base-$n"; n=$((n + 1)); done
else
    results="$(absolute "$results")"
    if [[ -d "$results" && -n "$(ls -A "$results")" ]]; then
        echo "gpu_suite.sh: $results is not empty; give a new folder" >&2
        exit 2
    fi
fi
mkdir -p "$results/logs" || exit 2
results="$(cd "$results" && pwd)"
if [[ -n "$archive" ]]; then
    archive="$(absolute "$archive")"
    mkdir -p "$(dirname "$archive")" || exit 2
fi
summary="$results/summary.txt"
: > "$summary"
failed=()
deadline=$((SECONDS + budget))
MIN_STEP_S="${GPU_SUITE_MIN_STEP_S:-15}"   # a step is not started with less left (tests lower it)

# pack: RESULTS_DIR as it is now into --archive (through a temporary name, so the archive is always whole).
pack() {
    [[ -n "$archive" ]] || return 0
    tar -C "$(dirname "$results")" -czf "$archive.partial" "$(basename "$results")" && mv -f "$archive.partial" "$archive"
}

# run_step NAME LIMIT COMMAND...: COMMAND under `timeout` with min(LIMIT, what the budget has left), its
# stdout and stderr into logs/NAME.log; records the outcome in summary.txt and packs; never stops the suite.
run_step() {
    local name="$1" limit="$2"
    shift 2
    local log="$results/logs/$name.log" left=$((deadline - SECONDS))
    if [[ $left -lt $limit ]]; then limit=$left; fi
    if [[ $limit -lt $MIN_STEP_S ]]; then
        record "$name" skipped 0 "$limit" "(${left}s of the budget left)"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    { echo "\$ $*"; echo "# limit ${limit}s"; echo; } > "$log"
    local start=$SECONDS status
    # in the background, so that a TERM or INT to the suite reaches `stop` at once, not after the step
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1 &
    else
        echo "# no timeout command: run without a limit" >> "$log"
        "$@" >> "$log" 2>&1 &
    fi
    step_pid=$! step_name="$name" step_start=$start
    wait "$step_pid"
    status=$?
    step_pid=""
    local outcome=ok
    case $status in
        0) ;;
        124|137) outcome=TIMEOUT; echo "# killed at its ${limit}s limit" >> "$log" ;;
        *) outcome=FAILED ;;
    esac
    record "$name" "$outcome" "$((SECONDS - start))" "$limit" "logs/$name.log$([[ $status -ne 0 ]] && echo " (exit $status)")"
    if [[ $status -ne 0 ]]; then
        failed+=("$name")
        tail -n 15 "$log" | cut -c1-200 | sed 's/^/    /'
    fi
}

record() {   # record NAME OUTCOME SECONDS LIMIT NOTE
    local line
    line="$(printf '%-16s %-8s %5ss / %4ss  %s' "$@")"
    echo "$line"
    echo "$line" >> "$summary"
    pack
}

environment() {
    nvidia-smi || echo "nvidia-smi failed or is missing: not a GPU machine?"
    "$PYTHON" - "$repo" <<'PY'
import importlib.metadata
import sys
from pathlib import Path

import torch
import triton

import fastdetr
import fastdetr.kernels

print("python", sys.version.split()[0], sys.executable, "| torch", torch.__version__, "| triton", triton.__version__)
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, "|", torch.cuda.get_device_name(), "| capability",
          torch.cuda.get_device_capability())
else:
    print("cuda available: False")
repo = Path(sys.argv[1]).resolve()
for module in (fastdetr, fastdetr.kernels):
    where = Path(module.__file__).resolve()
    print(f"{module.__name__} from {where}")
    if not where.is_relative_to(repo):
        sys.exit(f"{module.__name__} is imported from {where}, not from this checkout ({repo})")
for name in ("numpy", "scipy", "pillow", "matplotlib", "tqdm", "pytest", "pytest-timeout", "pycocotools",
             "setuptools"):
    try:
        print(f"  {name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"  {name} not installed")
PY
}
export -f environment
export repo

# The tests that mean something on a GPU: tests/test_gpu.py checks every fused op, layer and a whole
# optimized DETR-R50 on CUDA at DETR's shapes; tests/test_memory.py measures saved bytes at DETR-R50's.
# The kernel tests (tests/test_*_kernel.py) and the benchmark smoke tests build CPU tensors for Triton's
# interpreter, and test_kernel_report.py compiles ahead of time as the report step does: CI runs those.
# A test file that learns to run on CUDA tensors is added to this list.
GPU_TESTS=(
    tests/test_gpu.py
    tests/test_gpu_graph.py
    tests/test_memory.py
)
pytest_options=(-v -ra -p no:cacheprovider --junitxml "$results/pytest.xml")
if [[ "$mode" == smoke ]]; then
    # through the interpreter: one test, a whole (small) optimized DETR (the file takes minutes there)
    pytest_options+=(-k test_optimized_detr_r50_matches_the_reference)
fi
if "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1; then
    pytest_options+=(--timeout $((120 * scale)))   # one hung test fails alone, the rest still run
fi

if [[ "$mode" == smoke ]]; then
    export TRITON_INTERPRET=1 FASTDETR_GPU_TESTS_ON_CPU=1
    # tiny tensors: one thread is as fast, and two spin-wait whenever another process holds a core
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    bench_level=(--smoke)
    memory_args=(--small --device cpu)
    report_args=(--modules fastdetr.kernels.matching_cost --targets 90 --alignments generic --jobs 1)
else
    export TRITON_INTERPRET=0   # tests/conftest.py keeps an explicit 0
    bench_level=(--quick)
    if [[ "$mode" == full ]]; then bench_level=(); fi   # every case and provider, torch.compile's included
    memory_args=(--device cuda)
    report_args=()
fi

finish() {
    local status=$?
    trap - EXIT
    pack
    echo
    echo "== fastdetr GPU suite ($mode, ${budget}s budget, ${SECONDS}s used): $results"
    printf '%-16s %-8s %6s / %5s  %s\n' step outcome time limit log
    cat "$summary"
    if [[ -f "$results/headline.txt" ]]; then   # benchmarks/run.py rewrites it after every bench step
        echo "-- benchmarks (p50; x: the fastest fastdetr provider's speedup over the fastest other)"
        cut -c1-220 "$results/headline.txt"
    fi
    if [[ -f "$results/logs/convergence.log" ]]; then
        echo "-- convergence"
        tail -n 1 "$results/logs/convergence.log" | cut -c1-400
    fi
    if [[ -n "$archive" && -f "$archive" ]]; then echo "archive: $archive ($(du -k "$archive" | cut -f1) KiB)"; fi
    if [[ ${#failed[@]} -gt 0 ]]; then
        echo "failed: ${failed[*]} (see $summary)"
        if [[ $status -eq 0 ]]; then status=1; fi
    fi
    exit "$status"
}
# stop STATUS: the suite was told to stop (TERM, INT): end the running step, record it, exit (finish packs)
stop() {
    if [[ -n "${step_pid:-}" ]]; then
        kill -TERM "$step_pid" 2>/dev/null   # timeout passes it on to the step's command
        wait "$step_pid" 2>/dev/null
        record "$step_name" STOPPED "$((SECONDS - step_start))" - "logs/$step_name.log (the suite was stopped)"
        failed+=("$step_name")
        step_pid=""
    fi
    exit "$1"
}
step_pid=""
trap finish EXIT
trap 'stop 130' INT
trap 'stop 143' TERM

{
    echo "as run: $0 --$mode --budget $budget${archive:+ --archive $archive} $results"
    echo "started: $(date -u +%FT%TZ); python: $PYTHON; PYTHONPATH: $PYTHONPATH; TRITON_INTERPRET=$TRITON_INTERPRET"
} > "$results/suite.txt"
cat "$results/suite.txt"
pack

run_step environment $((15 * scale)) bash -c environment
BENCH_SUITES=(ceiling ops attention layers model matcher deformable_attention)
if [[ "$mode" == smoke ]]; then   # one process: each would spend more on importing torch than on its suite
    run_step bench $((60 * scale)) "$PYTHON" benchmarks/run.py --smoke --suites "${BENCH_SUITES[@]}" --out "$results"
else
    for suite in "${BENCH_SUITES[@]}"; do
        case $suite in
            ceiling|matcher) limit=20 ;; attention) limit=40 ;; deformable_attention) limit=50 ;;
            ops|layers) limit=45 ;;
            # 60 s before the static-shape case (estimated 10-30 s more) and Deformable-DETR-R50 (40-60 s more)
            model) limit=150 ;;
        esac
        run_step "bench-$suite" $((limit * scale)) "$PYTHON" benchmarks/run.py "${bench_level[@]}" \
            --suites "$suite" --append --out "$results"
    done
fi
run_step pytest $((140 * scale)) "$PYTHON" -m pytest "${pytest_options[@]}" "${GPU_TESTS[@]}"

# convergence: what the budget has left, at most 200 s (x4 with --full); each training a third of it less 50 s
limit=$((deadline - SECONDS))
if [[ $limit -gt $((200 * scale)) ]]; then limit=$((200 * scale)); fi
train_s=$(((limit - 50) / 3))
if [[ "$mode" == smoke ]]; then
    run_step convergence "$limit" "$PYTHON" benchmarks/convergence.py --cpu-check --steps 1 \
        --out "$results/convergence"
elif [[ $train_s -lt 10 ]]; then
    record convergence skipped 0 "$limit" "(${limit}s left: too little for two trainings)"
else
    run_step convergence "$limit" "$PYTHON" benchmarks/convergence.py --short --budget-s "$train_s" \
        --out "$results/convergence"
fi
run_step memory $((45 * scale)) "$PYTHON" -m fastdetr.memory "${memory_args[@]}"
run_step report $((60 * scale)) "$PYTHON" -m fastdetr.kernels.report "${report_args[@]}" \
    --json "$results/kernel_report.json"

if [[ ${#failed[@]} -gt 0 ]]; then exit 1; fi
exit 0
