"""The low-precision modes on every backend: against the float64 oracle, bit for bit across
backends (stochastic rounding), and the statistics of the rounding itself.

Modes (docs/low_precision.md): stochastic rounding of what is stored as bf16, float32 master
weights for fp16/bf16 parameters, bf16 moments, and float32 gradients for fp16/bf16 parameters.
"""

import math

import numpy as np
import pytest
import torch

from adaml_kernels import AdamL, adaml_step_, available_backends
from adaml_kernels.buckets import Bucket
from adaml_kernels.hyperparams import Hyperparams
from adaml_kernels.layout import DTYPE_CODES
from adaml_kernels.loss import StepInputs
from parity import (
    CASES, LOUD, MIXED_SIZES, Inputs, Mode, check_against_oracle, cpu_testable_backends,
    run_backend, run_oracle,
)
from tolerances import SR_MAX_Z, allowed_mismatch

BACKENDS = cpu_testable_backends()
HALF = (torch.float16, torch.bfloat16)
BF16 = torch.bfloat16

MODES = {
    "sr": Mode(stochastic_rounding=True, seed=11),
    "master": Mode(master_weights=True),
    "master_sr": Mode(master_weights=True, stochastic_rounding=True, seed=12),
    "bf16_state": Mode(state_dtype=BF16),
    "bf16_state_sr": Mode(state_dtype=BF16, stochastic_rounding=True, seed=13),
    "fp32_grads": Mode(grad_dtype=torch.float32),
    "fp32_grads_master": Mode(grad_dtype=torch.float32, master_weights=True),
    "everything": Mode(True, True, BF16, torch.float32, seed=2**64 - 7),
}


def dtypes_for(mode: Mode):
    """The parameter dtypes a mode concerns (others leave it without effect)."""
    if mode.grad_dtype is not None or mode.master_weights:
        return HALF
    if mode.state_dtype is not None:
        return (torch.float32,) + HALF
    return (BF16, torch.float16)  # stochastic rounding alone: fp16 must round to nearest


def mode_cases():
    return [
        pytest.param(b, d, dt, name, id=f"{name}-{b}-{d}-{str(dt)[6:]}")
        for name, mode in MODES.items() for b, d in BACKENDS for dt in dtypes_for(mode)
    ]


@pytest.mark.parametrize("backend,device,dtype,mode_name", mode_cases())
def test_every_mode_matches_the_oracle(backend, device, dtype, mode_name):
    # "everything": L2 decay, maximize, normalize_loss and every term of the update loud.
    hp = CASES["everything"]
    inputs = Inputs.random(MIXED_SIZES, hp, seed=21)
    check_against_oracle(backend, device, dtype, inputs, hp, mode=MODES[mode_name])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode_name", ["master_sr", "bf16_state_sr"])
def test_modes_with_decoupled_decay_match_the_oracle(backend, device, mode_name):
    # Decoupled decay scales the master weight (not the rounded parameter) before the step.
    hp = CASES["decoupled_weight_decay"]
    inputs = Inputs.random(MIXED_SIZES, hp, seed=23)
    check_against_oracle(backend, device, BF16, inputs, hp, mode=MODES[mode_name])


@pytest.mark.parametrize("backend,device,dtype,mode_name", [
    p for p in mode_cases() if p.values[3] in ("everything", "bf16_state_sr")])
def test_modes_with_parameters_without_gradients(backend, device, dtype, mode_name):
    # A late parameter (its first gradient in step 3), one every other step, one never.
    hp = CASES["normalize_loss"]

    def has_grad(step, tensor):
        return not ((tensor == 1 and step < 3) or (tensor == 4 and step % 2) or tensor == 7)

    inputs = Inputs.random(MIXED_SIZES, hp, seed=6).without_grads(has_grad)
    check_against_oracle(backend, device, dtype, inputs, hp, mode=MODES[mode_name])


def test_the_oracle_check_catches_wrong_rounding():
    # Rounding to nearest where the mode asks for stochastic rounding (or the other way round)
    # makes about a third of the bf16 values differ from the oracle's: far beyond the allowance.
    inputs = Inputs.random(MIXED_SIZES, LOUD, seed=22)
    for mode, wrong in ((MODES["sr"], Mode()), (MODES["bf16_state_sr"], Mode(state_dtype=BF16))):
        oracle = run_oracle(BF16, inputs, LOUD, mode)
        result = run_backend("reference", "cpu", BF16, inputs, LOUD, mode=wrong)
        got = np.concatenate([t.double().numpy() for t in result.params])
        expected = np.concatenate([s.p for s in oracle.params])
        assert np.mean(got != expected) > 10 * allowed_mismatch(0.0)


# ------------------------------------------------------------------ bitwise across backends


def _fused_and_reference():
    return [("reference", "cpu")] + [(b, d) for b, d in BACKENDS if b != "reference"]


def _decay_only_run(backend, device, sizes, steps=3, **options):
    """Steps in which the new value of each bf16 parameter is exactly p * (1 - lr * wd) in
    float32 on every backend (no gradient, eps = 0): what is stored differs only by rounding."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen).to(device, BF16).requires_grad_() for n in sizes]
    opt = AdamL(params, lr=0.05, eps=0.0, weight_decay=0.3, decoupled_weight_decay=True,
                backend=backend, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step(1.0)
    return params, opt


@pytest.mark.parametrize("options", [dict(stochastic_rounding=True, seed=3),
                                     dict(stochastic_rounding=True, seed=2**64 - 1),
                                     dict(stochastic_rounding=True, master_weights=True, seed=4)],
                         ids=["sr", "sr-big-seed", "sr-master"])
def test_stochastic_rounding_is_bitwise_equal_on_every_backend(options):
    sizes = [1, 2049, 7, 4096 + 3]
    results = {}
    for backend, device in _fused_and_reference():
        params, opt = _decay_only_run(backend, device, sizes, **options)
        results[(backend, device)] = [p.detach().cpu().view(torch.int16) for p in params]
        if options.get("master_weights"):
            results[(backend, device, "master")] = [
                opt.state[p]["master_param"].cpu() for p in params]
    ref = results[("reference", "cpu")]
    plain, _ = _decay_only_run("reference", "cpu", sizes)  # round to nearest
    assert any(not torch.equal(a, b.detach().view(torch.int16)) for a, b in zip(ref, plain))
    for key, got in results.items():
        expected = results[key[:2] if len(key) == 2 else ("reference", "cpu", "master")]
        for a, b in zip(got, expected):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("backend,device", [p for p in _fused_and_reference()
                                            if p[0] != "reference"])
def test_bf16_moments_round_bitwise_alike_on_every_backend(backend, device):
    # With beta1 = 0.5, phi = 0 and gamma = 1 the float32 moments are computed by the same
    # operations in every backend; only their rounding to bf16 is left to compare.
    def run(b, d):
        gen = torch.Generator().manual_seed(6)
        params = [torch.randn(n, generator=gen).to(d).requires_grad_() for n in (5, 3000)]
        opt = AdamL(params, lr=0.01, betas=(0.5, 0.9), eps=1e-3, phi=0.0, backend=b,
                    state_dtype=BF16, stochastic_rounding=True, seed=9)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(d)
            opt.step(1.0 + step)
        return [opt.state[p][k].cpu().view(torch.int16) for p in params
                for k in ("exp_avg", "exp_avg_sq")]

    for a, b in zip(run(backend, device), run("reference", "cpu")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_random_bits_depend_on_the_element_not_on_chunks_buckets_or_threads(backend, device):
    # The same parameter (index 1 in the optimizer) alone, or between others in a bucket (other
    # chunk boundaries, another position in the table), with 1 or 2 threads: the same bits.
    def second_param(sizes, threads=None):
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(8)
            first = torch.randn(sizes[0], generator=gen).to(device, BF16).requires_grad_()
            target = torch.full((5000,), 1.0, device=device, dtype=BF16, requires_grad=True)
            rest = [torch.randn(n).to(device, BF16).requires_grad_() for n in sizes[1:]]
            opt = AdamL([first, target], lr=0.05, eps=0.0, weight_decay=0.3,
                        decoupled_weight_decay=True, backend=backend, stochastic_rounding=True)
            if rest:
                opt.add_param_group({"params": rest})
            for p in [first, target] + rest:
                p.grad = torch.zeros_like(p)
            opt.step(1.0)
            return target.detach().cpu().view(torch.int16)
        finally:
            torch.set_num_threads(old)

    base = second_param([1])
    assert torch.unique(base).numel() == 2  # p * decay lies between two bf16 values
    assert torch.equal(second_param([3000, 17, 2048]), base)
    assert torch.equal(second_param([1], threads=1), base)


def test_a_shard_rounds_as_the_same_elements_of_the_whole_parameter():
    # Column 9 of the table (element offset): a tensor holding elements [n0, n) of a parameter
    # rounds exactly as those elements do when the whole parameter is stepped.
    from adaml_kernels import _extension, reference, triton_kernel

    n, n0 = 6000, 2500
    steps = {name: fn for name, fn in (("reference", reference.step),
                                       ("cpu", _extension.fused_step),
                                       ("triton", triton_kernel.step))
             if name in available_backends("cpu")}
    hp = Hyperparams(lr=0.05, eps=0.0, weight_decay=0.3, decoupled_weight_decay=True)
    inputs = StepInputs(torch.tensor(1.0), torch.tensor(1.0))

    def bucket(values, offset):
        k = values.numel()
        return Bucket([values.clone()], [torch.zeros(k, dtype=BF16)], [torch.zeros(k)],
                      [torch.zeros(k)], [torch.tensor(1.0)], param_indices=[4],
                      element_offsets=[offset], stochastic_rounding=True, seed=77)

    values = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(BF16)
    for name, fn in steps.items():
        whole, shard = bucket(values, 0), bucket(values[n0:], n0)
        fn(whole, hp, inputs)
        fn(shard, hp, inputs)
        assert torch.equal(shard.params[0].view(torch.int16),
                           whole.params[0][n0:].view(torch.int16))
        unshifted = bucket(values[n0:], 0)
        fn(unshifted, hp, inputs)
        assert not torch.equal(unshifted.params[0], shard.params[0]), name


def test_functional_form_takes_the_modes():
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(300, generator=gen).to(BF16)
    g = torch.randn(300, generator=gen)  # float32 gradients for bf16 params
    results = []
    for backend in [b for b in ("reference", "cpu", "triton") if b in available_backends("cpu")]:
        params, masters = [p.clone()], [p.float()]
        m, w = [torch.zeros(300, dtype=BF16)], [torch.zeros(300, dtype=BF16)]
        steps = [torch.zeros(())]
        for loss in (2.0, 1.5):
            taken = adaml_step_(params, [g], m, w, steps, torch.tensor(loss), backend=backend,
                                master_params=masters, stochastic_rounding=True, seed=5,
                                param_indices=[3])
            assert taken.item()
        results.append((params[0].clone(), masters[0].clone(), m[0].clone(), w[0].clone()))
    for got in results[1:]:  # the moments and the master weights alike (p: see the oracle tests)
        assert torch.equal(got[2].view(torch.int16), results[0][2].view(torch.int16))
        torch.testing.assert_close(got[1], results[0][1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the rounding's statistics


def rounding_z_scores(stored: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """How far bf16 values `stored` of float32 values `exact` are from stochastic rounding.

    Each stored value must be one of the two bf16 neighbours of its exact value (lo, lo + ulp);
    rounding up must happen with probability f = (exact - lo) / ulp. Returns z-scores of
    (1) the mean rounding error (unbiasedness: E[stored] = exact) and (2) the mean squared
    error against its expectation f (1 - f) ulp^2 (the variance of stochastic rounding).
    """
    x = exact.double().flatten()
    s = stored.double().flatten()
    lo = exact.flatten().view(torch.int32).bitwise_and(-65536).view(torch.float32).double()
    hi = (exact.flatten().view(torch.int32).bitwise_and(-65536) + 65536).view(torch.float32)
    ulp = hi.double() - lo
    assert torch.all((s == lo) | (s == hi.double())), "a value left its two bf16 neighbours"
    f, up = (x - lo) / ulp, (s != lo).double()
    var = f * (1 - f)
    z_mean = float((up - f).sum() / var.sum().sqrt().clamp(min=1e-12))
    err2 = (up - f) ** 2
    spread = (var * (1 - 2 * f) ** 2).sum().sqrt().clamp(min=1e-12)
    z_var = float((err2 - var).sum() / spread)
    return z_mean, z_var


FRACTIONS = [655, 19661, 32768, 45875, 64881]  # f = j / 2^16: ~0.01, 0.3, 0.5, 0.7, 0.99


def _rounded_parameters(backend, device, j, n, stochastic=True):
    """n bf16 parameters at 1.0 after one step that computes y = 1 - 2^-8 (1 - j/2^16) exactly
    in float32 (decoupled decay alone, lr = 1): y lies j/2^16 of the way from the bf16 value
    below it to the one above."""
    wd = 2.0**-8 * (1 - j / 2**16)
    p = torch.ones(n, device=device, dtype=BF16, requires_grad=True)
    opt = AdamL([p], lr=1.0, eps=0.0, weight_decay=wd, decoupled_weight_decay=True,
                backend=backend, stochastic_rounding=stochastic, seed=j)
    p.grad = torch.zeros_like(p)
    opt.step(1.0)
    exact = torch.full((n,), 1.0 - wd, dtype=torch.float32)
    assert float(exact[0]) == 1.0 - wd  # exactly representable
    return p.detach().cpu(), exact


def _n(backend, device):
    return 4096 if (backend == "triton" and device == "cpu") else 65536


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stochastic_rounding_of_parameters_is_unbiased_with_the_right_variance(backend, device):
    n = _n(backend, device)
    for j in FRACTIONS:
        stored, exact = _rounded_parameters(backend, device, j, n)
        z_mean, z_var = rounding_z_scores(stored, exact)
        assert abs(z_mean) < SR_MAX_Z and abs(z_var) < SR_MAX_Z, (j, z_mean, z_var)
        up = (stored.double() != stored.double().min()).double()
        # neighbours round independently: no correlation between elements i and i + 1
        corr = np.corrcoef(up[:-1].numpy(), up[1:].numpy())[0, 1]
        assert abs(corr) < SR_MAX_Z / math.sqrt(n), (j, corr)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_the_statistics_check_rejects_round_to_nearest_and_truncation(backend, device):
    n = _n(backend, device)
    for j in (19661, 45875):  # f = 0.3 and 0.7
        nearest, exact = _rounded_parameters(backend, device, j, n, stochastic=False)
        truncated = (exact.view(torch.int32) >> 16).to(torch.int16).view(BF16)
        for stored in (nearest, truncated):
            z_mean, _ = rounding_z_scores(stored, exact)
            assert abs(z_mean) > 5 * SR_MAX_Z


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stochastic_rounding_of_bf16_moments_is_unbiased_with_the_right_variance(backend,
                                                                                  device):
    # beta1 = beta2 = 0, gamma = 1, phi = 0, eps = 0: the float32 moments are exactly g and g*g.
    n = _n(backend, device)
    g = torch.rand(n, generator=torch.Generator().manual_seed(3)) + 1.0
    p = torch.zeros(n, device=device, requires_grad=True)
    opt = AdamL([p], lr=1e-3, betas=(0.0, 0.0), eps=0.0, phi=0.0, backend=backend,
                state_dtype=BF16, stochastic_rounding=True, seed=1)
    p.grad = g.to(device)
    opt.step(1.0)
    for key, exact in (("exp_avg", g), ("exp_avg_sq", g * g)):
        z_mean, z_var = rounding_z_scores(opt.state[p][key].cpu(), exact)
        assert abs(z_mean) < SR_MAX_Z and abs(z_var) < SR_MAX_Z, (key, z_mean, z_var)
    m_up = opt.state[p]["exp_avg"].cpu().float() > g
    w_up = opt.state[p]["exp_avg_sq"].cpu().float() > g * g
    # exp_avg and exp_avg_sq use different bits
    corr = np.corrcoef(m_up.double().numpy(), w_up.double().numpy())[0, 1]
    assert abs(corr) < SR_MAX_Z / math.sqrt(n)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rounding_bits_change_with_step_parameter_and_seed(backend, device):
    def ups(seed=0, index_first=False, steps=1):
        a = torch.ones(4096, device=device, dtype=BF16, requires_grad=True)
        b = torch.ones(4096, device=device, dtype=BF16, requires_grad=True)
        opt = AdamL([b, a] if index_first else [a, b], lr=1.0, eps=0.0,
                    weight_decay=2.0**-9, decoupled_weight_decay=True, backend=backend,
                    stochastic_rounding=True, seed=seed)
        outs = []
        for _ in range(steps):
            a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
            with torch.no_grad():
                a.fill_(1.0)
            opt.step(1.0)
            outs.append((a.detach().cpu().float() == 1.0).numpy().astype(float))
        return outs

    base = ups()[0]
    for other in (ups(seed=1)[0], ups(index_first=True)[0], ups(steps=2)[1]):
        corr = np.corrcoef(base, other)[0, 1]  # independent bits, about half agree
        assert abs(corr) < SR_MAX_Z / math.sqrt(base.size)
        assert 0.4 < np.mean(base == other) < 0.6


def _mode_bucket(dtype, seed=0, master=True, moments=BF16, grads=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    sizes = [5, 3000, 2048]
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    return Bucket(
        params, [torch.randn(n, generator=gen).to(grads) for n in sizes],
        [(0.1 * torch.randn(n, generator=gen)).to(moments) for n in sizes],
        [torch.rand(n, generator=gen).to(moments) for n in sizes],
        [torch.tensor(3.0) for _ in sizes],
        master_params=[p.float() for p in params] if master else None,
        param_indices=[4, 0, 9], element_offsets=[0, 0, 100], stochastic_rounding=True,
        seed=2**63 + 1,
    )


@pytest.mark.parametrize("op", ["fused_step_", "triton_step_"])
@pytest.mark.parametrize("dtype", HALF)
def test_opcheck_with_every_mode(op, dtype):
    from adaml_kernels import backends

    name = "cpu" if op == "fused_step_" else "triton"
    if name not in available_backends("cpu"):
        pytest.skip(backends.unavailable_reason(name, "cpu"))
    backends.step_function(name)  # imports the module that registers the op
    hp = Hyperparams(lr=0.01, weight_decay=0.1, normalize_loss=True)
    inputs = StepInputs(torch.tensor(1.5), torch.tensor(1.0), torch.tensor(2.0),
                        torch.tensor(2.0, dtype=torch.float64))
    args = _mode_bucket(dtype).fused_op_args(hp, inputs)
    torch.library.opcheck(getattr(torch.ops.adaml_kernels, op).default, args)


def test_fused_ops_refuse_inconsistent_mode_arguments():
    if "cpu" not in available_backends("cpu"):
        pytest.skip("needs adaml_kernels._C")
    hp, inputs = Hyperparams(), StepInputs(torch.tensor(1.0), torch.tensor(1.0))
    op = torch.ops.adaml_kernels.fused_step_
    args = list(_mode_bucket(BF16).fused_op_args(hp, inputs))
    bad = list(args)
    bad[5] = args[5][:1]
    with pytest.raises(RuntimeError, match="master_params has 1 tensors; config says one per"):
        op(*bad)
    bad = list(args)
    bad[5] = [x.double() for x in args[5]]
    with pytest.raises(RuntimeError, match=r"master_params\[0\] must be Float"):
        op(*bad)
    bad = list(args)
    bad[1] = [g.half() for g in args[1]]
    with pytest.raises(RuntimeError, match="config names other dtypes than the tensors'"):
        op(*bad)
    bad[11] = args[11]._replace(grad_dtype=DTYPE_CODES[torch.float16])
    with pytest.raises(RuntimeError, match="gradients must have the params' dtype, or float32"):
        op(*bad)
    f32 = list(_mode_bucket(torch.float32, master=False, grads=torch.float32).fused_op_args(
        hp, inputs))
    f32[5] = [p.clone() for p in f32[0]]
    with pytest.raises(RuntimeError, match="master_params has 3 tensors; config says none"):
        op(*f32)
    f32[11] = f32[11]._replace(master=1)
    with pytest.raises(RuntimeError, match="master weights are for float16/bfloat16 params"):
        op(*f32)
    f32 = list(_mode_bucket(torch.float32, master=False, moments=torch.float16).fused_op_args(
        hp, inputs))
    with pytest.raises(RuntimeError, match="moments must be float64 for float64 params, else "
                                           "float32, bfloat16 or uint8"):
        op(*f32)


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in available_backends("cuda"),
                    reason="needs a CUDA GPU and the CUDA kernel of adaml_kernels._C")
@pytest.mark.parametrize("dtype", (torch.float32,) + HALF)
@pytest.mark.parametrize("master,moments,grads", [
    (False, torch.float32, None), (True, torch.float32, None), (False, BF16, None),
    (True, BF16, torch.float32), (False, BF16, torch.float32)])
def test_cuda_kernel_matches_cpu_kernel_bitwise_in_every_mode(dtype, master, moments, grads):
    # Full updates (not only rounding): the two kernels share adaml_update.h, so every bit of
    # every array agrees, stochastic rounding included.
    from adaml_kernels import _extension

    if dtype == torch.float32 and (master or grads is not None):
        pytest.skip("master weights and float32 gradients are for half params")
    hp = Hyperparams(lr=0.01, beta1=0.8, beta2=0.95, eps=1e-3, gamma=0.6, phi=1.3,
                     weight_decay=0.1, maximize=True)
    results = []
    for device in ("cpu", "cuda"):
        b = _mode_bucket(dtype, seed=3, master=master, moments=moments, grads=grads or dtype)
        b = Bucket(*[[t.to(device) for t in ts] for ts in (b.params, b.grads, b.exp_avgs,
                                                          b.exp_avg_sqs, b.steps)],
                   master_params=None if not master else [x.to(device) for x in b.master_params],
                   param_indices=b.param_indices, element_offsets=b.element_offsets,
                   stochastic_rounding=True, seed=b.seed)
        for loss in (1.7, 0.9, 1.2):
            inputs = StepInputs(torch.tensor(loss, device=device),
                                torch.tensor(1.0, device=device),
                                torch.tensor(2.0, device=device))
            _extension.fused_step(b, hp, inputs)
        results.append([t.cpu() for t in b.params + b.exp_avgs + b.exp_avg_sqs
                        + (b.master_params or [])])
    for a, c in zip(*results):
        assert torch.equal(a.view(torch.uint8), c.view(torch.uint8))
