"""The Triton backend beyond parity: GPU code generation, the torch op, the functional form."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import adaml_kernels
from adaml_kernels import adaml_step_
from oracle import Hyper, Oracle, ParamState
from parity import LOUD, normwise_error
from tolerances import allowed_error

HERE = os.path.dirname(__file__)
needs_triton = pytest.mark.skipif(
    "triton" not in adaml_kernels.available_backends(), reason="triton cannot run here"
)


@needs_triton
def test_kernel_compiles_for_gpus_with_vector_accesses():
    # Compiles for sm_80 and sm_90 without a GPU; aligned data must get 16-byte accesses.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the package under test, not whichever checkout an editable install points at
    root = os.path.dirname(os.path.dirname(adaml_kernels.__file__))
    env["PYTHONPATH"] = os.pathsep.join([root] + [x for x in [env.get("PYTHONPATH")] if x])
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_triton_for_gpu.py"), "80", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    variants = json.loads(out.stdout)
    assert len(variants) == 12 + 8  # and 8-bit moments' variants, which only must compile
    for v in variants:
        if v.get("moment") == "uint8":
            assert v["accesses"], v
            continue
        vector = {"ld.global.v4.b32", "st.global.v4.b32"} <= set(v["accesses"])
        assert vector == v["aligned"], v


def functional_inputs(device, dtype, sizes, offset_elements, seed=0):
    """Params, grads and moments as views into NaN-filled buffers, with NaN gaps between them.

    A kernel that reads outside a tensor picks up NaN; one that writes outside leaves a gap
    changed; offset_elements misaligns every tensor (the kernels' scalar path).
    """
    rng = np.random.default_rng(seed)
    gap = 5

    def views(buffer_dtype, values=None):
        total = sum(sizes) + gap * (len(sizes) + 1) + offset_elements
        buf = torch.full((total,), math.nan, dtype=buffer_dtype, device=device)
        out, at = [], offset_elements + gap
        for i, n in enumerate(sizes):
            v = buf[at:at + n]
            v.copy_(torch.zeros(n) if values is None else torch.from_numpy(values[i]))
            out.append(v)
            at += n + gap
        return buf, out

    p_buf, params = views(dtype, [rng.standard_normal(n) for n in sizes])
    g_buf, grads = views(dtype, [rng.standard_normal(n) for n in sizes])
    m_buf, exp_avgs = views(torch.float32)
    w_buf, exp_avg_sqs = views(torch.float32)
    steps = [torch.zeros((), device=device) for _ in sizes]
    initial = torch.full((), math.nan, dtype=torch.float64, device=device)
    return (params, grads, exp_avgs, exp_avg_sqs, steps, initial), (p_buf, g_buf, m_buf, w_buf)


@needs_triton
@pytest.mark.parametrize("offset_elements", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functional_step_touches_exactly_its_elements(offset_elements, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [1, 2049, 7, 300]
    hp = Hyper(**{**LOUD.__dict__, "normalize_loss": True})
    results = {}
    for backend in ("reference", "triton"):
        (params, grads, m, w, steps, f1), buffers = functional_inputs(
            device, dtype, sizes, offset_elements)
        oracle = Oracle(hp, [ParamState(p.double().cpu().numpy(), storage=str(dtype)[6:])
                             for p in params])
        gaps_before = [torch.isnan(b).clone() for b in buffers]
        for loss in [2.0, 1.5, 1.2]:
            m_before, w_before = [t.clone() for t in m], [t.clone() for t in w]
            taken = adaml_step_(params, grads, m, w, steps, torch.tensor(loss, device=device),
                                initial_loss=f1, backend=backend, **hp.optimizer_kwargs())
            assert taken.item()
            oracle.step([g.double().cpu().numpy() for g in grads], loss)
            for t, before in zip(m + w, m_before + w_before):  # every element written
                assert not torch.any(t == before)
        for b, nan_before in zip(buffers, gaps_before):  # gaps untouched, nothing else NaN
            assert torch.equal(torch.isnan(b), nan_before)
        assert [float(s) for s in steps] == [3.0] * len(sizes)
        assert float(f1) == 2.0
        results[backend] = (normwise_error(params, [s.p for s in oracle.params]),
                            normwise_error(m, [s.m for s in oracle.params]),
                            normwise_error(w, [s.w for s in oracle.params]))
    for got, ref, quantity_dtype in zip(results["triton"], results["reference"],
                                        (dtype, torch.float32, torch.float32)):
        assert got <= allowed_error(quantity_dtype, ref)


@needs_triton
def test_functional_skip_returns_false_and_changes_nothing():
    (params, grads, m, w, steps, f1), buffers = functional_inputs("cpu", torch.float32, [5, 9], 0)
    before = [b.clone() for b in buffers]
    taken = adaml_step_(params, grads, m, w, steps, torch.tensor(math.inf), backend="triton")
    assert not taken.item()
    for b, c in zip(buffers, before):
        assert torch.equal(b.view(torch.int32), c.view(torch.int32))


def op_args(device="cpu", n=(5, 2049)):
    torch.manual_seed(0)
    from adaml_kernels.buckets import Bucket
    from adaml_kernels.hyperparams import Hyperparams
    from adaml_kernels.loss import StepInputs

    params = [torch.randn(k, device=device) for k in n]
    bucket = Bucket(
        params, [torch.randn(k, device=device) for k in n],
        [torch.randn(k, device=device) for k in n], [torch.rand(k, device=device) for k in n],
        [torch.tensor(3.0, device=device) for _ in n],
    )
    hp = Hyperparams(lr=0.01, normalize_loss=True, weight_decay=0.1)
    inputs = StepInputs(torch.tensor(1.5, device=device), torch.tensor(1.0, device=device),
                        None, torch.tensor(2.0, dtype=torch.float64, device=device))
    return bucket.fused_op_args(hp, inputs)


@needs_triton
def test_triton_op_passes_opcheck():
    torch.library.opcheck(torch.ops.adaml_kernels.triton_step_.default, op_args())


@needs_triton
def test_triton_op_updates_copies_not_the_tensors_its_table_points_at():
    # Under torch.compile the op may receive copies of the tensors its cached table names.
    args = op_args()
    originals = [t.clone() for t in args[0]]
    copies = [t.clone() for t in args[0]]
    torch.ops.adaml_kernels.triton_step_(copies, *args[1:])
    assert all(torch.equal(a, b) for a, b in zip(args[0], originals))
    assert not any(torch.equal(a, b) for a, b in zip(copies, originals))
