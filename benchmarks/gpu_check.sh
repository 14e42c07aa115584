#!/usr/bin/env bash
# The GPU check, in one command on a fresh GPU machine (torch, triton and nvcc preinstalled, no
# network, nothing downloaded):
#
#     benchmarks/gpu_check.sh OUTDIR
#
# 1. builds adaml_kernels._C in place (CPU and CUDA kernels; `setup.py build_ext --inplace`, no pip);
# 2. runs the GPU-relevant tests on the GPU: CUDA and Triton parity, the CUDA kernel's own tests,
#    no host synchronisation, CUDA-graph capture (Triton compiles for the GPU: TRITON_INTERPRET
#    is unset);
# 3. writes one log per step to OUTDIR (plus pytest's junit XML and summary.txt);
# 4. prints a short summary last.
#
# Every step runs under its own time limit and the script always reaches the summary; it exits
# non-zero if any step failed. Expected (not yet measured): under 12 minutes on an H200 machine
# (build ~1.5, tests ~2.5, quick benchmark ~4-6, host-overhead case ~0.5, FSDP2 case ~0.5, GPT
# example ~1). The benchmark runs with --quick (1M, 16M, 256M, GPT-2 small, 5,000 small tensors)
# on float32 and bfloat16 parameters, every backend in each of AdamL's low-precision modes that
# concerns the dtype (sr, master, bf16m, bf16m+sr, master+bf16m+sr); ADAML_GPU_BENCH_ARGS=
# (empty) runs the full 1M-1B sweep.
# To add a step (e.g. a benchmark), add a `run_step NAME LIMIT_S COMMAND...` line at the end of
# the steps section, before the summary.
#
# Environment: PYTHON (default python), MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST
# (default: the GPU's own arch plus setup.py's default list), ADAML_GPU_TESTS (test files).
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

PY=${PYTHON:-python}
unset TRITON_INTERPRET
export PYTHONDONTWRITEBYTECODE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
TESTS=${ADAML_GPU_TESTS:-tests/test_extension.py tests/test_gpu.py tests/test_parity.py tests/test_triton.py tests/test_optimizer.py tests/test_hardening.py tests/test_sharded.py tests/test_fast_path.py tests/test_precision.py tests/test_precision_behaviour.py}

STEP_NAMES=()
STEP_RESULTS=()
FAILED=0

# run_step NAME LIMIT_S COMMAND... : run COMMAND with stdout+stderr in $OUT/NAME.log.
run_step() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT/$name.log" start end rc result
    echo "==> $name"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    end=$(date +%s)
    if [ $rc -eq 0 ]; then
        result="ok"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        result="TIMEOUT after ${limit}s"
        FAILED=1
    else
        result="FAILED (exit $rc)"
        FAILED=1
    fi
    echo "    $result in $((end - start))s, log: $log"
    STEP_NAMES+=("$name")
    STEP_RESULTS+=("$result, $((end - start))s")
    return $rc
}

# --------------------------------------------------------------------------------- steps
run_step environment 30 bash -c "
    nvidia-smi; echo
    $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(\"gpu\", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
    command -v nvcc && nvcc --version; echo CUDA_HOME=\${CUDA_HOME:-unset}; nproc"

# The default arch list (sm_80, sm_90 + PTX) covers A100/H100/H200; add the GPU's own arch so a
# newer GPU runs native code too.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    GPU_ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)
    case "$GPU_ARCH" in
        8.0 | 9.0 | "") ;;
        *) export TORCH_CUDA_ARCH_LIST="8.0;9.0;${GPU_ARCH}+PTX" ;;
    esac
fi
run_step build 240 "$PY" setup.py build_ext --inplace

run_step extension 30 "$PY" -c "
import adaml_kernels, torch
from adaml_kernels import _extension
print('load_error:', _extension.load_error)
print('has_cuda_kernels:', _extension.has_cuda_kernels(), 'cpu ISA:', _extension.cpu_capability())
print('cuda backends:', adaml_kernels.available_backends('cuda'))
print('unavailable:', adaml_kernels.unavailable_backends('cuda'))
assert _extension.has_cuda_kernels() and 'cuda' in adaml_kernels.available_backends('cuda')
assert 'triton' in adaml_kernels.available_backends('cuda')
"

# shellcheck disable=SC2086  # TESTS is a list of paths
run_step tests 240 "$PY" -m pytest $TESTS -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/pytest.xml"

# Benchmarks: every backend against torch's fused and foreach Adam (1M-1B, GPT-2 small, 5,000
# small tensors), float32 and bfloat16 parameters, each low-precision mode with its bytes per
# parameter; then the extra peak memory one step allocates beyond the optimizer state (and the
# state itself, per mode).
# shellcheck disable=SC2086  # ADAML_GPU_BENCH_ARGS is a list of options
run_step bench 600 "$PY" -m adaml_kernels.bench --device cuda --no-progress ${ADAML_GPU_BENCH_ARGS---quick} \
    --dtype float32,bfloat16 --json "$OUT/bench.json" --plot "$OUT/bench.png"
run_step bench_memory 180 "$PY" -m adaml_kernels.bench --device cuda --memory-check --quick \
    --dtype float32,bfloat16 --json "$OUT/bench_memory.json"
# Host overhead: 1, 100, 1,000 and 5,000 one-element tensors with new gradients every step, one
# thread, AdamL against torch's fused and foreach Adam; a CUDA-graph replay is the lower bound.
run_step bench_host 120 "$PY" -m adaml_kernels.bench --device cuda --no-progress --quick \
    --host-overhead --json "$OUT/bench_host.json"
# FSDP2: a 8.4M-parameter stack of Linear layers sharded with fully_shard, nccl, one rank per GPU
# (at most 2; one GPU: a 1-rank mesh); only opt.step is timed, AdamL against torch fused Adam.
run_step bench_fsdp 180 "$PY" -m adaml_kernels.bench --device cuda --no-progress --quick \
    --fsdp --json "$OUT/bench_fsdp.json"
# The GPT example on the GPU: one process, compiled, cuda autocast, a DCP checkpoint at the end.
run_step example_gpt 240 "$PY" examples/train_gpt.py --device cuda --steps 100 --no-bar \
    --ckpt "$OUT/gpt_ckpt" --out "$OUT/train_gpt.json"

# --------------------------------------------------------------------------------- summary
{
    echo "gpu_check summary ($REPO)"
    if [ -f "$OUT/environment.log" ]; then
        grep -E '^(torch|gpu) ' "$OUT/environment.log" | sed 's/^/  /'
    fi
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-12s %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}"
    done
    if [ -f "$OUT/tests.log" ]; then
        echo "  pytest: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
        grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -n 20 | sed 's/^/    /'
    fi
    if [ -f "$OUT/bench.log" ]; then
        echo "  bench goals:"; grep -E '^  (PASS|FAIL|n/a) ' "$OUT/bench.log" | sed 's/^/  /'
    fi
    if [ -f "$OUT/bench_host.log" ]; then
        echo "  host-overhead goals:"
        grep -E '^  (PASS|FAIL|n/a) ' "$OUT/bench_host.log" | sed 's/^/  /'
        echo "  CUDA-graph replay (lower bound), us/step:"
        grep -E '^ *[0-9,]+ +[a-z]+\+graph ' "$OUT/bench_host.log" | sed 's/^/    /'
    fi
    if [ -f "$OUT/bench_fsdp.log" ]; then
        echo "  FSDP2 (opt.step ms, slowest rank):"
        grep -E '^(adaml-bench FSDP2|note: [0-9]+ GPU|AdamL .* / torch fused Adam)' \
            "$OUT/bench_fsdp.log" | sed 's/^/    /'
    fi
    if [ -f "$OUT/example_gpt.log" ]; then
        echo "  GPT example: $(grep -E '^done: ' "$OUT/example_gpt.log" | tail -n 1)"
    fi
    if [ -f "$OUT/bench_memory.log" ]; then
        echo "  extra peak bytes per step:"
        grep -E '^(16M|256M|gpt2_small|many_small) ' "$OUT/bench_memory.log" | sed 's/^/    /'
    fi
    if [ "$FAILED" -eq 0 ]; then echo "  RESULT: all steps passed"; else echo "  RESULT: FAILURES"; fi
} | tee "$OUT/summary.txt"
exit "$FAILED"
