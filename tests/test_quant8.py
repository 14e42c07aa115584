"""8-bit moments (state_dtype=torch.uint8): the quantizer against its definition (oracle.py), the
same codes on every backend, whole steps against the float64 oracle, and the state's bytes,
checkpoints and Adam round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import adaml_kernels
from adaml_kernels import AdamL, quant8
from oracle import Oracle, ParamState, quantize_8bit
from parity import LOUD, Inputs, as_torch, normwise_error
from quant8_inputs import awkward
from tolerances import (
    QUANT8_DRAWS, QUANT8_DRAWS_BLOCK, QUANT8_MISMATCH, QUANT8_MISMATCH_FLOOR,
    QUANT8_MOMENT_BOUND, QUANT8_PARAM_BOUND, QUANT8_SR_BIAS, QUANT8_SR_EMA, allowed_error,
)

U8 = torch.uint8
MAPS = [(quant8.EXP_AVG_MAP, True), (quant8.EXP_AVG_SQ_MAP, False)]
needs_cpu_kernel = pytest.mark.skipif(
    "cpu" not in adaml_kernels.available_backends("cpu"), reason="needs the C++ CPU kernel")


@pytest.mark.parametrize("which,signed", MAPS)
@pytest.mark.parametrize("seed", range(3))
def test_decoded_codes_are_the_values_the_definition_gives(which, signed, seed):
    x = awkward(4000, seed, signed)
    codes, scales = quant8.encode(x, which)
    assert codes.dtype == U8 and scales.shape == (quant8.num_blocks(4000),)
    np.testing.assert_array_equal(quant8.decode(codes, scales, which).double().numpy(),
                                  quantize_8bit(x.numpy(), signed))


def random_bits(shape, seed: int) -> torch.Tensor:
    """Stochastic rounding's random bits for a code (int32, below 2^RANDOM_BITS)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, 1 << quant8.RANDOM_BITS, shape, generator=g, dtype=torch.int32)


@pytest.mark.parametrize("which,signed", MAPS)
@pytest.mark.parametrize("seed", range(3))
def test_stochastic_codes_are_the_values_the_definition_gives(which, signed, seed):
    x = awkward(4000, seed, signed)
    random = random_bits(x.shape, seed)
    codes, scales = quant8.encode(x, which, random)
    assert torch.equal(scales, quant8.encode(x, which)[1])  # the scale does not depend on it
    np.testing.assert_array_equal(quant8.decode(codes, scales, which).double().numpy(),
                                  quantize_8bit(x.numpy(), signed, random.numpy()))
    nearest = quant8.encode(x, which)[0]
    magnitude = nearest.to(torch.int32) & (0x7F if signed else 0xFF)
    inexact = (quant8.decode(nearest, scales, which) != x) & (magnitude > 1)
    assert (codes != nearest)[inexact].float().mean() > 0.1  # the bits are used


def test_stochastic_rounding_is_unbiased_where_rounding_to_nearest_is_not():
    # One block: its largest value sets the scale; the others lie between codes, where
    # rounding to nearest is off by up to half a code step (2^-4 relative) every time.
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(QUANT8_DRAWS_BLOCK, generator=g) * 0.9 + 0.05) * 2.0**-4
    x[0] = 1.0
    for which in (quant8.EXP_AVG_MAP, quant8.EXP_AVG_SQ_MAP):
        total = torch.zeros_like(x, dtype=torch.float64)
        for draw in range(QUANT8_DRAWS):
            codes, scales = quant8.encode(x, which, random_bits(x.shape, draw))
            total += quant8.decode(codes, scales, which).double()
        bias = (total / QUANT8_DRAWS / x.double() - 1).abs()
        nearest = quant8.decode(*quant8.encode(x, which), which).double() / x.double() - 1
        assert bias.max() <= QUANT8_SR_BIAS, bias.max()
        assert nearest.abs().max() > 2 * QUANT8_SR_BIAS  # (the test can tell them apart)


def test_an_ema_through_stochastic_codes_tracks_the_exact_one():
    # w <- b2 w + (1 - b2) x from w = 0, through 8-bit codes each step. Rounding to nearest
    # stalls once a step's change is below half a code step (x / w > 64 for b2 = 0.999);
    # rounded stochastically, the codes follow the exact EMA.
    b2, steps = 0.999, 3000
    g = torch.Generator().manual_seed(1)
    x = torch.rand(QUANT8_DRAWS_BLOCK, generator=g) + 0.5
    exact = torch.zeros_like(x, dtype=torch.float64)
    codes = {True: quant8.encode(torch.zeros_like(x), quant8.EXP_AVG_SQ_MAP),
             False: quant8.encode(torch.zeros_like(x), quant8.EXP_AVG_SQ_MAP)}
    for k in range(steps):
        exact = b2 * exact + (1 - b2) * x.double()
        for sr, (c, s) in codes.items():
            w = quant8.decode(c, s, quant8.EXP_AVG_SQ_MAP)
            w = b2 * w + (1 - b2) * x
            codes[sr] = quant8.encode(w, quant8.EXP_AVG_SQ_MAP,
                                      random_bits(x.shape, k) if sr else None)
    ratio = {sr: (quant8.decode(*cs, quant8.EXP_AVG_SQ_MAP).double() / exact).median().item()
             for sr, cs in codes.items()}
    assert abs(ratio[True] - 1) <= QUANT8_SR_EMA, ratio
    assert ratio[False] < 0.1, ratio  # rounding to nearest stalled


def test_exp_avg_codes_are_float8_e4m3fn_codes_of_the_value_over_the_scale_times_256():
    x = awkward(4000, 7, signed=True)
    x[1000] = 1.0  # (no NaN: torch's NaN code carries the sign)
    codes, scales = quant8.encode(x, quant8.EXP_AVG_MAP)
    y = x / scales.repeat_interleave(quant8.QUANT_BLOCK)[:4000] * 256
    fp8 = y.to(torch.float8_e4m3fn).view(U8)
    torch.testing.assert_close(codes, torch.where(fp8 == 0x80, 0, fp8), rtol=0, atol=0)


@needs_cpu_kernel
@pytest.mark.parametrize("which,signed", MAPS)
def test_the_cpu_kernel_quantizes_bitwise_as_the_reference(which, signed):
    for seed in range(3):
        x = awkward(10_000 + seed, seed, signed)
        x[2000] = float("inf") if signed else float("inf")
        got_codes, got_scales = torch.ops.adaml_kernels.quantize_8bit(x, which)
        codes, scales = quant8.encode(x, which)
        assert torch.equal(got_codes, codes) and torch.equal(got_scales, scales)
        random = random_bits(x.shape, seed)
        got_codes, got_scales = torch.ops.adaml_kernels.quantize_8bit(x, which, random)
        codes, scales = quant8.encode(x, which, random)
        assert torch.equal(got_codes, codes) and torch.equal(got_scales, scales)
        decoded = torch.ops.adaml_kernels.dequantize_8bit(codes, scales, which)
        assert torch.equal(decoded.view(torch.int32),
                           quant8.decode(codes, scales, which).view(torch.int32))


@needs_cpu_kernel
def test_opcheck_of_the_quantizer_ops():
    x = torch.nan_to_num(awkward(2000, 1, signed=True))
    for which in (quant8.EXP_AVG_MAP, quant8.EXP_AVG_SQ_MAP):
        v = x if which == quant8.EXP_AVG_MAP else x.abs()
        torch.library.opcheck(torch.ops.adaml_kernels.quantize_8bit.default, (v, which))
        torch.library.opcheck(torch.ops.adaml_kernels.quantize_8bit.default,
                              (v, which, random_bits(v.shape, 0)))
        codes, scales = quant8.encode(v, which)
        torch.library.opcheck(torch.ops.adaml_kernels.dequantize_8bit.default,
                              (codes, scales, which))


def _block_absmax(x: torch.Tensor, which: int) -> torch.Tensor:
    """Each element's block's absmax, at least the smallest scale's half (the bounds' absmax)."""
    blocks = quant8.num_blocks(x.numel())
    padded = torch.zeros(blocks * quant8.QUANT_BLOCK, dtype=torch.float64)
    padded[: x.numel()] = x.double().abs()
    absmax = padded.reshape(blocks, -1).amax(1).clamp(min=quant8.zero_scale(which) / 2)
    return absmax.repeat_interleave(quant8.QUANT_BLOCK)[: x.numel()]


def test_the_documented_error_bounds_hold():
    for seed in range(3):
        m = awkward(20_000, seed, signed=True)
        m[1000] = 0.0
        decoded = quant8.decode(*quant8.encode(m, quant8.EXP_AVG_MAP), quant8.EXP_AVG_MAP)
        err = (decoded.double() - m.double()).abs()
        absmax = _block_absmax(m, quant8.EXP_AVG_MAP)
        wide = m.double().abs() >= absmax * 2.0**-13
        assert (err[wide] <= m.double().abs()[wide] * 2.0**-4).all()
        assert (err[~wide] <= absmax[~wide] * 2.0**-17).all()
        w = m.abs()
        decoded = quant8.decode(*quant8.encode(w, quant8.EXP_AVG_SQ_MAP), quant8.EXP_AVG_SQ_MAP)
        err = (decoded.double() - w.double()).abs()
        absmax = _block_absmax(w, quant8.EXP_AVG_SQ_MAP)
        wide = w.double() >= absmax * 2.0**-29
        assert (err[wide] <= w.double()[wide] * 2.0**-4).all()
        assert (err[~wide] <= absmax[~wide] * 2.0**-32).all()
        assert not ((decoded == 0) & (w > 0)).any()  # a positive w never decodes to 0


def test_inf_saturates_and_nan_stays_nan():
    x = torch.tensor([1.0, float("inf"), -float("inf"), float("nan")] + [0.5] * 300)
    decoded = quant8.decode(*quant8.encode(x, quant8.EXP_AVG_MAP), quant8.EXP_AVG_MAP)
    scale = 2.0**127  # inf's exponent, clamped
    assert decoded[1] == 1.75 * scale and decoded[2] == -1.75 * scale and decoded[3].isnan()
    assert decoded[0] == 0 and decoded[4] == 0  # far below the block's scale


def test_encoding_decoded_values_gives_the_same_values():
    for which, signed in MAPS:
        decoded = quant8.decode(*quant8.encode(awkward(5000, 3, signed), which), which)
        again = quant8.decode(*quant8.encode(decoded, which), which)
        assert torch.equal(again.view(torch.int32), decoded.view(torch.int32))


# ------------------------------------------------------------------------------ whole steps

SIZES = [5000, 4096, 300, 12_345]  # 300: below MIN_8BIT_NUMEL, keeps float32 moments


# (backend, device) pairs the whole-step tests run: the CUDA kernel where there is a GPU.
STEP_BACKENDS = [("reference", "cpu"), ("cpu", "cpu")] + (
    [("cuda", "cuda")] if torch.cuda.is_available()
    and "cuda" in adaml_kernels.available_backends("cuda") else [])


def run_backend(backend: str, dtype, inputs: Inputs, device="cpu", **options):
    params = [as_torch(p, dtype, device).requires_grad_() for p in inputs.params]
    opt = AdamL(params, backend=backend, state_dtype=U8, **LOUD.optimizer_kwargs(), **options)
    for grads, loss in zip(inputs.grads, inputs.losses):
        for p, g in zip(params, grads):
            p.grad = as_torch(g, dtype, device)
        opt.step(torch.tensor(loss, dtype=torch.float32, device=device))
    return params, opt


def moments_of(opt, p) -> tuple[torch.Tensor, torch.Tensor]:
    """p's moments as float32 values (decoded where they are 8-bit)."""
    st = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
    if st["exp_avg"].dtype != U8:
        return st["exp_avg"], st["exp_avg_sq"]
    return (quant8.decode_moment(st["exp_avg"], st["exp_avg_scale"], "exp_avg"),
            quant8.decode_moment(st["exp_avg_sq"], st["exp_avg_sq_scale"], "exp_avg_sq"))


def run_oracle(dtype, inputs: Inputs, master_weights=False, stochastic_rounding=False) -> Oracle:
    storage = str(dtype).removeprefix("torch.")
    states = []
    for j, p in enumerate(inputs.params):
        held = as_torch(p, dtype, "cpu").double().numpy()
        states.append(ParamState(
            held, storage=storage, index=j, master=held.copy() if master_weights else None,
            moments="uint8" if p.size >= quant8.MIN_8BIT_NUMEL else "float32"))
    oracle = Oracle(LOUD, states, stochastic_rounding=stochastic_rounding)
    for grads, loss in zip(inputs.grads, inputs.losses):
        oracle.step([as_torch(g, dtype, "cpu").double().numpy() for g in grads],
                    float(np.float32(loss)))
    return oracle


def errors(params, opt, oracle: Oracle) -> dict:
    moments = [moments_of(opt, p) for p in params]
    eight_bit = [opt.state[p]["exp_avg"].dtype == U8 for p in params]
    assert eight_bit == [n >= quant8.MIN_8BIT_NUMEL for n in SIZES]
    out = {"param": normwise_error(params, [s.p for s in oracle.params])}
    for i, key in enumerate(("exp_avg", "exp_avg_sq")):
        values = [mw[i] for mw in moments]
        expected = [getattr(s, "mw"[i]) for s in oracle.params]
        out[key] = normwise_error(values, expected)
        # The share of 8-bit moments that are not the oracle's value: a wrong map, scale or
        # rounding changes most of them; float32 against float64 flips a rare one.
        pairs = [(v, e) for v, e, q in zip(values, expected, eight_bit) if q]
        out[key + "_mismatch"] = float(np.mean(np.concatenate(
            [v.double().numpy().ravel() != e.ravel() for v, e in pairs])))
    return out


CASES = {"fp32": (torch.float32, {}),
         "fp32+sr": (torch.float32, dict(stochastic_rounding=True)),
         "bf16+master+sr": (torch.bfloat16, dict(master_weights=True, stochastic_rounding=True))}


@pytest.mark.parametrize("backend,device", STEP_BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(2))
def test_steps_against_the_float64_oracle(backend, device, case, seed):
    if backend not in adaml_kernels.available_backends(device):
        pytest.skip(f"{backend} is not available here")
    dtype, options = CASES[case]
    inputs = Inputs.random(SIZES, LOUD, seed)
    oracle = run_oracle(dtype, inputs, **options)
    got = errors(*run_backend(backend, dtype, inputs, device, **options), oracle)
    ref = errors(*run_backend("reference", dtype, inputs, **options), oracle)
    assert ref["param"] <= QUANT8_PARAM_BOUND[dtype], ref
    assert got["param"] <= allowed_error(dtype, ref["param"]), (got, ref)
    for key in ("exp_avg", "exp_avg_sq"):
        assert ref[key] <= QUANT8_MOMENT_BOUND and got[key] <= QUANT8_MOMENT_BOUND, (got, ref)
        assert ref[key + "_mismatch"] <= QUANT8_MISMATCH[dtype], ref
        assert got[key + "_mismatch"] <= 2 * ref[key + "_mismatch"] + QUANT8_MISMATCH_FLOOR


@pytest.mark.parametrize("backend,device", STEP_BACKENDS[1:])
@pytest.mark.parametrize("case", CASES)
def test_fused_backends_give_the_reference_codes(backend, device, case):
    if backend not in adaml_kernels.available_backends(device):
        pytest.skip(f"{backend} is not available here")
    dtype, options = CASES[case]
    inputs = Inputs.random(SIZES, LOUD, 5)
    params_r, opt_r = run_backend("reference", dtype, inputs, **options)
    params_c, opt_c = run_backend(backend, dtype, inputs, device, **options)
    for pr, pc in zip(params_r, params_c):
        for key, value in opt_r.state[pr].items():
            other = opt_c.state[pc][key]
            if isinstance(value, torch.Tensor) and value.dtype == U8:
                # codes: the same but for a rare float32 rounding difference on a boundary
                assert (value != other.cpu()).float().mean() <= QUANT8_MISMATCH_FLOOR, key
        torch.testing.assert_close(pc.detach().cpu().float(), pr.detach().float(),
                                   rtol=0, atol=QUANT8_PARAM_BOUND[dtype])


# ------------------------------------------------------------------------------ state

def _model_and_data(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(),
                                torch.nn.Linear(128, 32)).to(dtype)
    x, y = torch.randn(16, 64, dtype=dtype), torch.randn(16, 32, dtype=dtype)
    return model, x, y


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        opt.zero_grad()
        loss.backward()
        opt.step(loss)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_state_dict_round_trip_resumes_bitwise(backend):
    if backend not in adaml_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    model, x, y = _model_and_data()
    opt = AdamL(model.parameters(), lr=1e-2, backend=backend, state_dtype=U8)
    _train(model, opt, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, x, y, 3)

    resumed, _, _ = _model_and_data()
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed.load_state_dict(saved["model"])
    opt2 = AdamL(resumed.parameters(), lr=1e-2, backend=backend, state_dtype=U8)
    opt2.load_state_dict(saved["opt"])
    _train(resumed, opt2, x, y, 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt2.state[b][key]), key


def test_the_moments_take_at_most_2_1_bytes_per_parameter():
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    opt = AdamL([p], state_dtype=U8, backend="reference")
    p.grad = torch.randn_like(p)
    opt.step(1.0)
    st = opt.state[p]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for key in ("exp_avg", "exp_avg_sq", *quant8.SCALE_KEYS.values())
                for t in [st[key]]}
    assert sum(storages.values()) / p.numel() <= 2.1


def test_small_tensors_keep_float32_moments():
    big = torch.nn.Parameter(torch.randn(quant8.MIN_8BIT_NUMEL))
    small = torch.nn.Parameter(torch.randn(quant8.MIN_8BIT_NUMEL - 1))
    opt = AdamL([big, small], state_dtype=U8, backend="reference")
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step(1.0)
    assert opt.state[big]["exp_avg"].dtype == U8 and "exp_avg_scale" in opt.state[big]
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    assert "exp_avg_scale" not in opt.state[small]


def test_an_adam_checkpoint_warm_starts_8bit_adaml_and_back():
    model, x, y = _model_and_data()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        adam.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        adam.step()
    opt = AdamL(model.parameters(), lr=1e-2, state_dtype=U8, backend="reference")
    opt.load_state_dict(adam.state_dict())
    _train(model, opt, x, y, 0)  # nothing stepped: the state is laid out at the next step
    params = list(model.parameters())
    p = params[0]  # 64 x 128: 8-bit
    _train(model, opt, x, y, 1)
    assert opt.state[p]["exp_avg"].dtype == U8

    back = torch.optim.Adam(model.parameters(), lr=1e-2)
    back.load_state_dict(adaml_kernels.dequantized_state_dict(opt.state_dict()))
    m, w = moments_of(opt, p)
    assert torch.equal(back.state[p]["exp_avg"], m)
    assert torch.equal(back.state[p]["exp_avg_sq"], w)
    assert "exp_avg_scale" not in back.state[p]
    assert float(back.state[p]["step"]) == 4.0


def test_an_8bit_checkpoint_loads_into_a_float32_adaml_decoded_and_back():
    model, x, y = _model_and_data()
    opt = AdamL(model.parameters(), lr=1e-2, state_dtype=U8, backend="reference")
    _train(model, opt, x, y, 2)
    params = list(model.parameters())
    plain = AdamL(params, lr=1e-2, backend="reference")
    plain.load_state_dict(opt.state_dict())
    for p in params:
        m, w = moments_of(opt, p)
        assert torch.equal(plain.state[p]["exp_avg"], m)
        assert torch.equal(plain.state[p]["exp_avg_sq"], w)
        assert "exp_avg_scale" not in plain.state[p]
    # Back to 8 bits from the decoded values: they encode to themselves, so a step from them is
    # bitwise the step from the original codes.
    twin, _, _ = _model_and_data()
    twin.load_state_dict(model.state_dict())
    again = AdamL(twin.parameters(), lr=1e-2, state_dtype=U8, backend="reference")
    again.load_state_dict(plain.state_dict())
    _train(model, opt, x, y, 1)
    _train(twin, again, x, y, 1)
    for a, b in zip(params, twin.parameters()):
        assert torch.equal(a, b)
        m, w = moments_of(opt, a)
        m2, w2 = moments_of(again, b)
        assert torch.equal(m, m2) and torch.equal(w, w2)
