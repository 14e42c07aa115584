#!/usr/bin/env bash
# The GPU check, in two parts, each one command on a GPU machine (torch, triton and nvcc
# preinstalled, no network, nothing downloaded, no pip):
#
#     benchmarks/gpu_check.sh core  OUTDIR    # first: build, extension check, correctness tests
#     benchmarks/gpu_check.sh bench OUTDIR    # then, on the same machine: benchmarks
#
# Run `core` first: it is the most valuable part. Both parts may write to the same OUTDIR (one log
# per step, NAME.log); each part ends with its own summary, OUTDIR/summary_core.txt or
# OUTDIR/summary_bench.txt, and exits non-zero if any of its steps failed.
#
# core  environment (15 s), build (180 s), extension (30 s), tests (240 s): limits 465 s in all.
#       The build (`setup.py build_ext --inplace`: the CPU and CUDA kernels of adaml_kernels._C)
#       is skipped when the built extension is up to date: build/gpu_check.stamp records a hash
#       of csrc/*, setup.py, the torch version and TORCH_CUDA_ARCH_LIST, and the build is
#       skipped when that hash matches and the .so is there. The tests are the GPU-relevant
#       ones on the GPU: CUDA and Triton parity, the CUDA kernel's own tests, no host
#       synchronisation, CUDA-graph capture (Triton compiles for the GPU: TRITON_INTERPRET is
#       unset); pytest's junit XML goes to OUTDIR/pytest.xml.
#       Expected, estimated, not measured: about 4-5 minutes on an H100 (build ~1.5, tests ~2.5),
#       about 3 when the build is skipped.
# bench environment (15 s), bench (170 s), bench_memory (60 s), release_memory (50 s),
#       bench_host (60 s), bench_fsdp (60 s), example_gpt (110 s): limits 525 s in all. Never
#       builds: it stops with an error unless `core` has built the extension for the current
#       sources.
#       Expected, estimated, not measured: about 5-6 minutes on an H100.
#       To fit the limits, the benchmark runs with --quick --sizes 1M,16M (single tensors of 1M
#       and 16M parameters, GPT-2 small, 5,000 small tensors; --quick alone also runs 256M) on
#       float32 and bfloat16 parameters, every backend in each of AdamL's low-precision modes
#       that concerns the dtype (sr, master, bf16m, bf16m+sr, master+bf16m+sr, 8bit); the memory
#       check runs 16M and both lists (not 256M). ADAML_GPU_BENCH_ARGS replaces `--quick --sizes 1M,16M`
#       (e.g. ADAML_GPU_BENCH_ARGS= runs the full 1M-1B sweep, which needs a longer limit:
#       ADAML_GPU_BENCH_LIMIT, seconds).
#
# Every step runs under its own time limit and each part always reaches its summary.
# To add a step, add a `run_step NAME LIMIT_S COMMAND...` line to the part's function, keeping
# the part's limits under about 540 s (one command may run at most 10 minutes on the GPU machine).
#
# Environment: PYTHON (default python), MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST
# (default: the GPU's own arch plus setup.py's default list), ADAML_GPU_TESTS (test files),
# ADAML_GPU_BENCH_ARGS, ADAML_GPU_BENCH_LIMIT.
set -u -o pipefail

usage() {
    echo "usage: $0 core|bench OUTDIR" >&2
    echo "  core:  build (skipped when up to date), extension check, GPU tests (run first)" >&2
    echo "  bench: benchmarks, memory check, host overhead, FSDP2, GPT example (after core)" >&2
    exit 2
}
if [ $# -ne 2 ]; then
    usage
fi
PART=$1
case "$PART" in
    core | bench) ;;
    *) usage ;;
esac
mkdir -p "$2" || exit 2
OUT=$(cd "$2" && pwd)
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

PY=${PYTHON:-python}
unset TRITON_INTERPRET
export PYTHONDONTWRITEBYTECODE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
TESTS=${ADAML_GPU_TESTS:-tests/test_extension.py tests/test_gpu.py tests/test_quant8.py tests/test_quant8_triton.py tests/test_parity.py tests/test_triton.py tests/test_optimizer.py tests/test_hardening.py tests/test_sharded.py tests/test_fast_path.py tests/test_precision.py tests/test_precision_behaviour.py tests/test_telemetry.py}
STAMP="$REPO/build/gpu_check.stamp"

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
    if [ "$rc" -eq 0 ]; then
        result="ok"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        result="TIMEOUT after ${limit}s"
        FAILED=1
    else
        result="FAILED (exit $rc)"
        FAILED=1
    fi
    echo "    $result in $((end - start))s, log: $log"
    STEP_NAMES+=("$name")
    STEP_RESULTS+=("$result, $((end - start))s")
    return "$rc"
}

# skip_step NAME WHY : record a step that did not need to run.
skip_step() {
    echo "==> $1"
    echo "    skipped: $2"
    STEP_NAMES+=("$1")
    STEP_RESULTS+=("skipped: $2")
}

environment() {
    run_step "environment_$PART" 15 bash -c "
        nvidia-smi; echo
        $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(\"gpu\", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
        command -v nvcc && nvcc --version; echo CUDA_HOME=\${CUDA_HOME:-unset}; nproc"
}

# The default arch list (sm_80, sm_90 + PTX) covers A100/H100/H200; add the GPU's own arch so a
# newer GPU runs native code too. Both parts compute it alike, so `bench` checks the same stamp.
set_arch_list() {
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        local gpu_arch
        gpu_arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)
        case "$gpu_arch" in
            8.0 | 9.0 | "") ;;
            *) export TORCH_CUDA_ARCH_LIST="8.0;9.0;${gpu_arch}+PTX" ;;
        esac
    fi
}

# What the built extension depends on: the sources, the build script, torch, the arch list.
build_hash() {
    {
        cat setup.py csrc/*
        $PY -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null
        echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
    } | sha256sum | cut -d' ' -f1
}

# extension_up_to_date: the .so is there and the stamp matches the current build hash.
extension_up_to_date() {
    compgen -G "adaml_kernels/_C*.so" >/dev/null && [ -f "$STAMP" ] \
        && [ "$(cat "$STAMP")" = "$(build_hash)" ]
}

check_extension() {
    run_step "extension_$PART" 30 "$PY" -c "
import adaml_kernels, torch
from adaml_kernels import _extension
print('load_error:', _extension.load_error)
print('has_cuda_kernels:', _extension.has_cuda_kernels(), 'cpu ISA:', _extension.cpu_capability())
print('cuda backends:', adaml_kernels.available_backends('cuda'))
print('unavailable:', adaml_kernels.unavailable_backends('cuda'))
assert _extension.has_cuda_kernels() and 'cuda' in adaml_kernels.available_backends('cuda')
assert 'triton' in adaml_kernels.available_backends('cuda')
"
}

# --------------------------------------------------------------------------------- core
part_core() {
    environment
    set_arch_list
    if extension_up_to_date; then
        skip_step build "adaml_kernels._C is up to date ($STAMP)"
    else
        rm -f "$STAMP"
        if run_step build 180 "$PY" setup.py build_ext --inplace; then
            mkdir -p "$(dirname "$STAMP")" && build_hash >"$STAMP"
        fi
    fi
    check_extension
    # shellcheck disable=SC2086  # TESTS is a list of paths
    run_step tests 240 "$PY" -m pytest $TESTS -q -rfEs -p no:cacheprovider \
        --junitxml="$OUT/pytest.xml"
}

# --------------------------------------------------------------------------------- bench
part_bench() {
    set_arch_list
    if ! extension_up_to_date; then
        echo "gpu_check bench: adaml_kernels._C is not built for the current sources" >&2
        echo "  (no adaml_kernels/_C*.so, or $STAMP missing or stale)." >&2
        echo "  Run \`$0 core OUTDIR\` first; bench never builds." >&2
        exit 3
    fi
    environment
    check_extension
    # Every backend against torch's fused and foreach Adam (1M and 16M in one tensor, GPT-2 small,
    # 5,000 small tensors), float32 and bfloat16 parameters, each low-precision mode with its
    # bytes per parameter (telemetry on among them, beside off); then the extra peak memory one
    # step allocates beyond the optimizer state (and the state itself, per mode).
    # shellcheck disable=SC2086  # ADAML_GPU_BENCH_ARGS is a list of options
    run_step bench "${ADAML_GPU_BENCH_LIMIT:-170}" "$PY" -m adaml_kernels.bench --device cuda \
        --no-progress ${ADAML_GPU_BENCH_ARGS---quick --sizes 1M,16M} \
        --dtype float32,bfloat16 --json "$OUT/bench.json" --plot "$OUT/bench.png"
    run_step bench_memory 60 "$PY" -m adaml_kernels.bench --device cuda --memory-check --quick \
        --sizes 16M --dtype float32,bfloat16 --json "$OUT/bench_memory.json"
    # Gradient release's peak memory (torch.cuda.max_memory_allocated of steps 3-5; 24 x
    # nn.Linear(2048, 2048), 384 MiB of float32 gradients, buckets of 25 MiB) against the
    # ordinary AdamL step and torch fused Adam, each in a fresh process.
    run_step release_memory 50 "$PY" benchmarks/gradient_release_memory.py --device cuda \
        --json "$OUT/release_memory.json"
    # Host overhead: 1, 100, 1,000 and 5,000 one-element tensors with new gradients every step,
    # one thread, AdamL against torch's fused and foreach Adam; a CUDA-graph replay is the lower
    # bound.
    run_step bench_host 60 "$PY" -m adaml_kernels.bench --device cuda --no-progress --quick \
        --host-overhead --json "$OUT/bench_host.json"
    # FSDP2: a 8.4M-parameter stack of Linear layers sharded with fully_shard, nccl, one rank per
    # GPU (at most 2; one GPU: a 1-rank mesh); only opt.step is timed, AdamL against torch fused
    # Adam.
    run_step bench_fsdp 60 "$PY" -m adaml_kernels.bench --device cuda --no-progress --quick \
        --fsdp --json "$OUT/bench_fsdp.json"
    # The GPT example on the GPU: one process, compiled, cuda autocast, a DCP checkpoint at the
    # end.
    run_step example_gpt 110 "$PY" examples/train_gpt.py --device cuda --steps 100 --no-bar \
        --ckpt "$OUT/gpt_ckpt" --out "$OUT/train_gpt.json"
}

# --------------------------------------------------------------------------------- summary
summary() {
    echo "gpu_check $PART summary ($REPO)"
    if [ -f "$OUT/environment_$PART.log" ]; then
        grep -E '^(torch|gpu) ' "$OUT/environment_$PART.log" | sed 's/^/  /'
    fi
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-18s %s\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}"
    done
    if [ "$PART" = core ] && [ -f "$OUT/tests.log" ]; then
        echo "  pytest: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
        grep -E '^(FAILED|ERROR) ' "$OUT/tests.log" | head -n 20 | sed 's/^/    /'
    fi
    if [ "$PART" = bench ]; then
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
        if [ -f "$OUT/release_memory.log" ]; then
            echo "  gradient release, peak GPU memory (MiB):"
            grep -E '^(optimizer|adaml_release|adaml|torch_fused) |^gradient release lowers' \
                "$OUT/release_memory.log" | sed 's/^/    /'
        fi
        if [ -f "$OUT/bench_memory.log" ]; then
            echo "  extra peak bytes per step:"
            grep -E '^(16M|256M|gpt2_small|many_small) ' "$OUT/bench_memory.log" | sed 's/^/    /'
        fi
    fi
    if [ "$FAILED" -eq 0 ]; then echo "  RESULT: all steps passed"; else echo "  RESULT: FAILURES"; fi
}

case "$PART" in
    core) part_core ;;
    bench) part_bench ;;
esac
summary | tee "$OUT/summary_$PART.txt"
exit "$FAILED"
