"""The compiled extension adaml_kernels._C: op registration and opcheck, the pointer-table
contract, the CPU kernel's own edge cases, and (on a GPU) the CUDA kernel.

Parity of the "cpu" and "cuda" backends with the float64 spec, over all dtypes, switches and
sizes, is in test_parity.py, which picks them up once available_backends() lists them.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import adaml_kernels
from adaml_kernels import _extension, backends
from adaml_kernels.buckets import CHUNK, Bucket, moment_dtype
from adaml_kernels.hyperparams import Hyperparams
from adaml_kernels.loss import StepInputs

needs_ext = pytest.mark.skipif(
    _extension.load_error is not None, reason=f"adaml_kernels._C: {_extension.load_error}"
)
HAS_GPU = torch.cuda.is_available()
needs_cuda_kernel = pytest.mark.skipif(
    not (HAS_GPU and _extension.has_cuda_kernels()),
    reason="needs a CUDA GPU and adaml_kernels._C built with its CUDA kernel",
)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Every switch on: decoupled decay, maximize, normalisation, and a grad scale where given.
LOUD = Hyperparams(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-3, gamma=0.6, phi=1.3,
                   loss_offset=0.25, normalize_loss=True, weight_decay=0.1,
                   decoupled_weight_decay=True, maximize=True)


def make_bucket(sizes, dtype, *, device="cpu", seed=0, offset=0) -> Bucket:
    """Random params, grads and moments, step 3. `offset` > 0 makes every tensor a view that
    starts `offset` elements into its storage (unaligned addresses)."""
    gen = torch.Generator().manual_seed(seed)
    mdt = moment_dtype(dtype)

    def tensor(n, dt, fn=torch.randn):
        values = fn(n, generator=gen, dtype=torch.float64).to(dt)
        storage = torch.empty(n + offset, dtype=dt, device=device)
        storage[offset:].copy_(values)
        return storage[offset:]

    return Bucket(
        [tensor(n, dtype) for n in sizes],
        [tensor(n, dtype) for n in sizes],
        [tensor(n, mdt).mul_(0.1) for n in sizes],
        [tensor(n, mdt, torch.rand) for n in sizes],
        [torch.tensor(3.0, device=device) for _ in sizes],
    )


def clone_bucket(b: Bucket) -> Bucket:
    return Bucket(
        [t.clone() for t in b.params], [t.clone() for t in b.grads],
        [t.clone() for t in b.exp_avgs], [t.clone() for t in b.exp_avg_sqs],
        [t.clone() for t in b.steps],
    )


def state_of(b: Bucket) -> list[torch.Tensor]:
    return [*b.params, *b.exp_avgs, *b.exp_avg_sqs]


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bitwise_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Equal bit patterns: NaN equals NaN, -0.0 differs from 0.0."""
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        a, b = a.detach().cpu(), b.detach().cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, i
        bits = _INT_OF_SIZE[a.element_size()]
        assert torch.equal(a.view(bits), b.view(bits)), f"tensor {i} differs"


def inputs(device="cpu", loss=1.7, take=1.0, grad_scale=None, initial_loss=2.1) -> StepInputs:
    return StepInputs(
        torch.tensor(loss, device=device), torch.tensor(take, device=device),
        None if grad_scale is None else torch.tensor(grad_scale, device=device),
        torch.tensor(initial_loss, dtype=torch.float64, device=device),
    )


def step(b: Bucket, hp=LOUD, loss=1.7, take=1.0, grad_scale=None) -> None:
    """One call of the fused op on bucket b (the step count is not advanced)."""
    _extension.fused_step(b, hp, inputs(b.device, loss, take, grad_scale))


# ------------------------------------------------------------------------------ build, load


def _nvcc_matching_torch() -> str | None:
    """Why the CUDA kernel may rightly be missing from this build, or None if it must be there."""
    if os.environ.get("ADAML_BUILD_EXT") == "0":
        return "ADAML_BUILD_EXT=0"
    if torch.version.cuda is None:
        return "torch has no CUDA support"
    nvcc = None
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            nvcc = os.path.join(root, "bin", "nvcc")
            break
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return "nvcc not found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.", out)
    if m is None or m.group(1) != torch.version.cuda.split(".")[0]:
        return f"nvcc ({out.strip().splitlines()[-1] if out else '?'}) does not match torch's CUDA"
    return None


def test_extension_is_built():
    if os.environ.get("ADAML_BUILD_EXT") == "0":
        pytest.skip("ADAML_BUILD_EXT=0: the extension is not built")
    assert _extension.load_error is None
    assert "cpu" in adaml_kernels.available_backends("cpu")


@needs_ext
def test_cuda_sources_are_compiled_in_when_nvcc_is_present():
    reason = _nvcc_matching_torch()
    if reason:
        pytest.skip(reason)
    assert _extension.has_cuda_kernels(), "nvcc is here, but _C has no CUDA kernel"


@needs_ext
def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    for dtype in CPU_DTYPES:
        assert backends.select("auto", torch.device("cpu"), dtype) == "cpu"


def test_unavailable_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_extension, "load_error", "not built (ADAML_BUILD_EXT=0 or build failed)")
    assert "cpu" not in adaml_kernels.available_backends("cpu")
    assert "ADAML_BUILD_EXT=0" in adaml_kernels.unavailable_backends("cpu")["cpu"]
    assert backends.select("auto", torch.device("cpu"), torch.float32) == "reference"


# ------------------------------------------------------------------------------ op contract


@needs_ext
@pytest.mark.parametrize(
    "dtype,hp,lr_tensor,grad_scale",
    [
        (torch.float32, LOUD, False, None),
        (torch.float32, Hyperparams(), True, 2.0),
        (torch.float64, LOUD, True, None),
        (torch.bfloat16, Hyperparams(weight_decay=0.1), False, 4.0),
        (torch.float16, LOUD, False, 0.5),
    ],
    ids=["f32-loud", "f32-lr_tensor-grad_scale", "f64-lr_tensor", "bf16-l2", "f16-grad_scale"],
)
def test_opcheck(dtype, hp, lr_tensor, grad_scale):
    from dataclasses import replace

    if lr_tensor:
        hp = replace(hp, lr=torch.tensor(hp.lr, dtype=torch.float64))
    b = make_bucket([5, 3000, 2048], dtype)
    args = b.fused_op_args(hp, inputs(loss=1.3, grad_scale=grad_scale))
    torch.library.opcheck(torch.ops.adaml_kernels.fused_step_.default, args)


@needs_ext
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_stale_table_updates_the_tensors_passed(dtype):
    # torch.compile's functionalization hands the op copies of the tensors it mutates, with the
    # bucket's cached table: the op must update the copies, never the stale addresses.
    b = make_bucket([7, 4100, 1], dtype)
    originals = [t.clone() for t in state_of(b)]
    expected = clone_bucket(b)
    step(expected)
    args = list(b.fused_op_args(LOUD, inputs(loss=1.7)))
    copies = [[t.clone() for t in args[i]] for i in (0, 2, 3)]
    args[0], args[2], args[3] = copies
    torch.ops.adaml_kernels.fused_step_(*args)
    assert_bitwise_equal(state_of(b), originals)
    assert_bitwise_equal([t for c in copies for t in c], state_of(expected))


@needs_ext
def test_skipped_step_reads_and_writes_nothing():
    b = make_bucket([3, 5000], torch.float32)
    before = [t.clone() for t in state_of(b)]
    step(b, take=0.0)
    assert_bitwise_equal(state_of(b), before)


@needs_ext
def test_bad_arguments_are_rejected_with_a_reason():
    b = make_bucket([10, 20], torch.float32)
    args = list(b.fused_op_args(LOUD, inputs(loss=1.0)))
    bad = list(args)
    bad[1] = args[1][:1]
    with pytest.raises(RuntimeError, match="grads has 1 tensors, params has 2"):
        torch.ops.adaml_kernels.fused_step_(*bad)
    bad = list(args)
    bad[2] = [t.double() for t in args[2]]
    with pytest.raises(RuntimeError, match="config names other dtypes than the tensors'"):
        torch.ops.adaml_kernels.fused_step_(*bad)
    bad = list(args)
    bad[11] = args[11][:-1]
    with pytest.raises(RuntimeError, match="config must have 6 values"):
        torch.ops.adaml_kernels.fused_step_(*bad)
    bad = list(args)
    bad[10] = args[10][:-1]
    with pytest.raises(RuntimeError, match="hyper must have 11 values"):
        torch.ops.adaml_kernels.fused_step_(*bad)
    bad = list(args)
    bad[16] = None
    with pytest.raises(RuntimeError, match="normalize_loss needs initial_loss"):
        torch.ops.adaml_kernels.fused_step_(*bad)
    bad = list(args)
    bad[16] = args[16].float()
    with pytest.raises(RuntimeError, match="initial_loss must be float64"):
        torch.ops.adaml_kernels.fused_step_(*bad)
    bad = list(args)
    bad[0] = [args[0][0], torch.zeros(20, 2)[:, 0]]  # strided: not dense
    with pytest.raises(RuntimeError, match="dense"):
        torch.ops.adaml_kernels.fused_step_(*bad)


@needs_ext
def test_empty_tensors_between_others_change_nothing_around_them():
    b = make_bucket([0, 5, 0, 3], torch.float32)
    expected = make_bucket([5, 3], torch.float32)
    for src, dst in ((1, 0), (3, 1)):
        for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
            getattr(expected, name)[dst].copy_(getattr(b, name)[src])
    step(b)
    step(expected)
    assert_bitwise_equal([b.params[1], b.params[3], b.exp_avgs[1], b.exp_avg_sqs[3]],
                         [expected.params[0], expected.params[1], expected.exp_avgs[0],
                          expected.exp_avg_sqs[1]])


# ------------------------------------------------------------------------------ CPU kernel


def poisoned_inputs(sizes, dtype, device, offset, seed=0):
    """Params, grads and moments as views into NaN-filled buffers, NaN gaps between them: a read
    outside a tensor brings NaN in, a write outside one changes a gap."""
    gen = torch.Generator().manual_seed(seed)
    gap = 5

    def views(buffer_dtype, random):
        total = sum(sizes) + gap * (len(sizes) + 1) + offset
        buf = torch.full((total,), math.nan, dtype=buffer_dtype, device=device)
        out, at = [], offset + gap
        for n in sizes:
            v = buf[at:at + n]
            v.copy_(torch.randn(n, generator=gen) if random else torch.zeros(n))
            out.append(v)
            at += n + gap
        return buf, out

    mdt = moment_dtype(dtype)
    buffers, tensors = zip(views(dtype, True), views(dtype, True), views(mdt, False),
                           views(mdt, False))
    steps = [torch.zeros((), device=device) for _ in sizes]
    f1 = torch.full((), math.nan, dtype=torch.float64, device=device)
    return (*tensors, steps, f1), buffers


def check_touches_exactly_its_elements(backend, device, dtype, offset):
    from adaml_kernels import adaml_step_

    sizes = [1, 2049, 7, 300, 4096]
    (params, grads, m, w, steps, f1), buffers = poisoned_inputs(sizes, dtype, device, offset)
    nan_before = [torch.isnan(b).clone() for b in buffers]
    for loss in (2.0, 1.5, 1.2):
        m_before, w_before = [t.clone() for t in m], [t.clone() for t in w]
        adaml_step_(params, grads, m, w, steps, torch.tensor(loss, device=device),
                    initial_loss=f1, lr=1e-2, normalize_loss=True, backend=backend)
        for t, before in zip(m + w, m_before + w_before):  # every element written, each step
            assert not torch.any(t == before)
    for b, before in zip(buffers, nan_before):  # gaps untouched, nothing else NaN
        assert torch.equal(torch.isnan(b), before)
    assert [float(s) for s in steps] == [3.0] * len(sizes)
    assert float(f1) == 2.0


@needs_ext
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_cpu_step_touches_exactly_its_elements(dtype, offset):
    check_touches_exactly_its_elements("cpu", "cpu", dtype, offset)




@needs_ext
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_every_tail_length_matches_the_vector_body(dtype):
    # The update is element-wise: a tensor of n elements must get exactly the first n values of
    # a long tensor stepped with the same data, whatever n is modulo the SIMD width (up to 64
    # bytes) or the chunk. No FMA contraction anywhere, so scalar tails and vector bodies agree.
    sizes = list(range(1, 40)) + [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 17]
    long = make_bucket([max(sizes)], dtype, seed=1)
    short = Bucket(
        *[[t[:n].clone() for n in sizes] for t in
          (long.params[0], long.grads[0], long.exp_avgs[0], long.exp_avg_sqs[0])],
        [long.steps[0].clone() for _ in sizes],
    )
    step(long)
    step(short)
    for i, n in enumerate(sizes):
        assert_bitwise_equal(
            [short.params[i], short.exp_avgs[i], short.exp_avg_sqs[i]],
            [long.params[0][:n], long.exp_avgs[0][:n], long.exp_avg_sqs[0][:n]],
        )


@needs_ext
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("offset", [1, 3])
def test_unaligned_views_match_aligned_tensors(dtype, offset):
    sizes = [1, 33, 5000]
    aligned = make_bucket(sizes, dtype, seed=2)
    unaligned = make_bucket(sizes, dtype, seed=2, offset=offset)
    assert_bitwise_equal(state_of(unaligned), state_of(aligned))  # same data, other addresses
    assert any(p.data_ptr() % 16 for p in unaligned.params)
    step(aligned, grad_scale=2.0)
    step(unaligned, grad_scale=2.0)
    assert_bitwise_equal(state_of(unaligned), state_of(aligned))


@needs_ext
def test_one_and_two_threads_give_identical_results():
    sizes = [100_003, 7, 64 * CHUNK, 1]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            b = make_bucket(sizes, torch.float32, seed=3)
            step(b)
            results.append(state_of(b))
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(results[1], results[0])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_value_round_trips(dtype):
    # g = 0, w = 0 and eps = 0 leave p unchanged: each of the 65536 bit patterns must survive
    # the kernel's load (to float32) and store (rounded back); NaNs stay NaN.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    p = bits.view(dtype).clone()
    b = Bucket([p], [torch.zeros_like(p)], [torch.zeros(p.numel())], [torch.zeros(p.numel())],
               [torch.tensor(1.0)])
    step(b, hp=Hyperparams(lr=1e-2, eps=0.0))
    expected = bits.view(dtype)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(p), nan)
    assert torch.equal(p.view(torch.int16)[~nan], bits[~nan])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stored_params_round_to_nearest_even(dtype):
    # Decoupled decay alone (g = 0, eps = 0): p_new = rn(float32(p) * 0.95), as torch rounds.
    p = torch.randn(100_000, generator=torch.Generator().manual_seed(4)).to(dtype)
    p = torch.cat([p, torch.tensor([65504.0, 6e-8, -1e-40, 0.0, float("inf")]).to(dtype)])
    decay = torch.tensor(1.0 - 0.5 * 0.1, dtype=torch.float32)
    expected = (p.float() * decay).to(dtype)
    b = Bucket([p], [torch.zeros_like(p)], [torch.zeros(p.numel())], [torch.zeros(p.numel())],
               [torch.tensor(1.0)])
    step(b, hp=Hyperparams(lr=0.5, eps=0.0, weight_decay=0.1, decoupled_weight_decay=True))
    assert torch.equal(p.view(torch.int16), expected.view(torch.int16))


_ISA_SCRIPT = """
import sys, torch
from adaml_kernels import _extension
sys.path.insert(0, sys.argv[2])
from test_extension import make_bucket, state_of, step
out = {}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    b = make_bucket([1, 37, 5000], dtype, seed=5)
    step(b, grad_scale=2.0)
    out[str(dtype)] = state_of(b)
torch.save({"isa": _extension.cpu_capability(), "out": out}, sys.argv[1])
"""


@needs_ext
def test_every_instruction_set_gives_identical_results(tmp_path):
    # The CPU kernel is compiled for several instruction sets and picks one at run time; all
    # must agree bit for bit. ADAML_CPU_CAPABILITY caps the choice in a fresh process.
    order = ["default", "avx2", "avx512"]
    best = _extension.cpu_capability()
    if best == "default":
        pytest.skip("this CPU runs only the baseline x86-64 variant")
    results = {}
    for isa in order[:order.index(best) + 1]:
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, ADAML_CPU_CAPABILITY=isa)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path), os.path.dirname(__file__)],
                       env=env, check=True)
        results[isa] = torch.load(path)
        assert results[isa]["isa"] == isa
    for isa in results:
        for dtype, tensors in results["default"]["out"].items():
            assert_bitwise_equal(results[isa]["out"][dtype], tensors)


# ------------------------------------------------------------------------------ CUDA kernel


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_kernel_matches_cpu_kernel_bitwise(dtype, offset):
    # Both kernels run the same header with IEEE operations and no contraction: the GPU must
    # compute exactly what the CPU tests check. (The per-tensor scalars come from double pow()
    # on either side, whose last-bit differences could only matter at a float32 rounding tie.)
    sizes = [1, 7, CHUNK, CHUNK + 5, 100_003, 0]
    cpu = make_bucket(sizes, dtype, seed=6, offset=offset)
    gpu = make_bucket(sizes, dtype, seed=6, offset=offset, device="cuda")
    for loss in (1.7, 0.9, 1.2):
        step(cpu, loss=loss, grad_scale=2.0)
        step(gpu, loss=loss, grad_scale=2.0)
    assert_bitwise_equal(state_of(gpu), state_of(cpu))


@needs_cuda_kernel
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_cuda_step_touches_exactly_its_elements(dtype, offset):
    check_touches_exactly_its_elements("cuda", "cuda", dtype, offset)


@needs_cuda_kernel
def test_cuda_opcheck():
    b = make_bucket([5, 3000, 2048], torch.bfloat16, device="cuda")
    args = b.fused_op_args(LOUD, inputs("cuda", loss=1.3, grad_scale=2.0))
    torch.library.opcheck(torch.ops.adaml_kernels.fused_step_.default, args)


@needs_cuda_kernel
def test_cuda_kernel_indexes_past_2_to_the_31():
    # One bf16 tensor of 2^31 + 2 chunks + 3 elements (12 B/element: ~26 GB), then a small one:
    # element offsets past 2^31, byte offsets past 2^32. Constant data, so every element must
    # end equal to the small tensor's.
    n = 2**31 + 2 * CHUNK + 3
    if torch.cuda.mem_get_info()[0] < 12 * n + (2 << 30):
        pytest.skip("needs ~28 GB of free GPU memory")

    def pair(value, dtype=torch.bfloat16):
        return [torch.full((size,), value, device="cuda", dtype=dtype) for size in (n, 9)]

    big = Bucket(pair(0.5), pair(0.25), pair(0.0, torch.float32), pair(0.0, torch.float32),
                 [torch.tensor(1.0, device="cuda") for _ in range(2)])
    hp = Hyperparams(lr=1e-2)
    step(big, hp=hp, loss=1.0)
    expected = [big.params[1][0].item(), big.exp_avgs[1][0].item(), big.exp_avg_sqs[1][0].item()]
    assert expected[0] != 0.5
    for t, v in zip((big.params[0], big.exp_avgs[0], big.exp_avg_sqs[0]), expected):
        assert int((t != v).sum()) == 0
        assert t[-1].item() == v and t[2**31 + 1].item() == v
    del big
    torch.cuda.empty_cache()
