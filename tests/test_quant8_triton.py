"""8-bit moments (state_dtype=torch.uint8) on the Triton backend: its quantizer bitwise against
quant8.py, whole steps against the reference backend, a skipped step, and the op's table."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import adaml_kernels
from adaml_kernels import AdamL, quant8
from parity import LOUD, Inputs, as_torch
from quant8_inputs import awkward
from tolerances import QUANT8_MISMATCH_FLOOR, QUANT8_PARAM_BOUND

needs_triton = pytest.mark.skipif(
    "triton" not in adaml_kernels.available_backends(), reason="triton cannot run here"
)
if "triton" in adaml_kernels.available_backends():
    from adaml_kernels.triton_quant8 import dequantize_8bit_triton, quantize_8bit_triton

U8 = torch.uint8
BLOCK = quant8.QUANT_BLOCK
MAPS = [(quant8.EXP_AVG_MAP, True), (quant8.EXP_AVG_SQ_MAP, False)]


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    mismatch = (a != b).nonzero().flatten()[:10].tolist()
    assert not mismatch, mismatch


@needs_triton
@pytest.mark.parametrize("which,signed", MAPS)
@pytest.mark.parametrize("n", [4000, 1, 100, 2 * 2048 + 300, 5120])
def test_the_triton_quantizer_gives_the_reference_codes_and_scales(which, signed, n):
    for seed in range(2):
        x = awkward(max(n, 4000), seed, signed, extremes=True)
        x = x[:n].contiguous() if n < 4000 else x
        codes, scales = quantize_8bit_triton(x, which)
        want_codes, want_scales = quant8.encode(x, which)
        assert_bitwise(codes, want_codes)
        assert_bitwise(scales, want_scales)
        random = torch.randint(0, 1 << quant8.RANDOM_BITS, x.shape, dtype=torch.int32,
                               generator=torch.Generator().manual_seed(seed))
        codes, scales = quantize_8bit_triton(x, which, random)
        want_codes, want_scales = quant8.encode(x, which, random)
        assert_bitwise(codes, want_codes)
        assert_bitwise(scales, want_scales)


@needs_triton
@pytest.mark.parametrize("which,signed", MAPS)
def test_the_triton_quantizer_decodes_every_code_at_every_scale_as_the_reference(which, signed):
    s_min = quant8._FORMATS[which][3]
    exponents = torch.arange(s_min, quant8.SCALE_EXPONENT_MAX + 1)
    scales = torch.ldexp(torch.ones(len(exponents)), exponents.to(torch.int32))
    codes = torch.arange(256, dtype=torch.int64).repeat(len(exponents)).to(U8)
    assert_bitwise(dequantize_8bit_triton(codes, scales, which),
                   quant8.decode(codes, scales, which))


@needs_triton
def test_the_triton_quantizer_round_trips_decoded_values():
    for which, signed in MAPS:
        codes, scales = quant8.encode(awkward(5000, 3, signed, extremes=True), which)
        again = quantize_8bit_triton(dequantize_8bit_triton(codes, scales, which), which)
        assert_bitwise(again[0], codes)
        assert_bitwise(again[1], scales)


# ------------------------------------------------------------------------------ whole steps

SIZES = [5000, 4096, 300, 6000]  # 300: below MIN_8BIT_NUMEL, keeps float32 moments
CASES = {"fp32": (torch.float32, {}),
         "fp32+sr": (torch.float32, dict(stochastic_rounding=True)),
         "bf16+master+sr": (torch.bfloat16, dict(master_weights=True, stochastic_rounding=True))}
HYPER = {"loud": LOUD,
         "decoupled_decay": replace(LOUD, weight_decay=0.1, decoupled_weight_decay=True)}


def run_backend(backend: str, dtype, inputs: Inputs, hyper=LOUD, **options):
    params = [as_torch(p, dtype, "cpu").requires_grad_() for p in inputs.params]
    opt = AdamL(params, backend=backend, state_dtype=U8, **hyper.optimizer_kwargs(), **options)
    for grads, loss in zip(inputs.grads, inputs.losses):
        for p, g in zip(params, grads):
            p.grad = as_torch(g, dtype, "cpu")
        opt.step(torch.tensor(loss, dtype=torch.float32))
    return params, opt


def assert_same_codes(params_a, opt_a, params_b, opt_b, atol) -> None:
    """The 8-bit codes equal but for a rare float32 rounding difference on a boundary, the
    scales of blocks whose codes are equal equal, the rest of the state bitwise equal, and
    the parameters close."""
    for pa, pb in zip(params_a, params_b):
        state_a, state_b = opt_a.state[pa], opt_b.state[pb]
        assert state_a.keys() == state_b.keys()
        assert (state_a["exp_avg"].dtype == U8) == (pa.numel() >= quant8.MIN_8BIT_NUMEL)
        for key, a in state_a.items():
            b = state_b[key]
            if not isinstance(a, torch.Tensor) or key in quant8.SCALE_KEYS.values():
                continue
            if a.dtype == U8:
                differ = a != b
                assert differ.float().mean() <= QUANT8_MISMATCH_FLOOR, (key, differ.sum())
                scale_key = quant8.SCALE_KEYS[key]
                blocks = torch.cat([differ, differ.new_zeros(-a.numel() % BLOCK)])
                same = ~blocks.reshape(-1, BLOCK).any(1)
                assert_bitwise(state_a[scale_key][same], state_b[scale_key][same])
            elif key == "step":
                assert torch.equal(a, b)
            else:  # float32 moments (the small tensor) and master weights
                torch.testing.assert_close(a, b, rtol=0, atol=atol)
        torch.testing.assert_close(pa.detach().float(), pb.detach().float(), rtol=0, atol=atol)


@needs_triton
@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("case", CASES)
def test_triton_steps_give_the_reference_codes(case, hyper):
    dtype, options = CASES[case]
    inputs = Inputs.random(SIZES, LOUD, 11)
    params_t, opt_t = run_backend("triton", dtype, inputs, HYPER[hyper], **options)
    params_r, opt_r = run_backend("reference", dtype, inputs, HYPER[hyper], **options)
    assert_same_codes(params_t, opt_t, params_r, opt_r, QUANT8_PARAM_BOUND[dtype])


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_a_skipped_step_changes_no_code_scale_or_param(case):
    dtype, options = CASES[case]
    inputs = Inputs.random(SIZES, LOUD, 4)
    params, opt = run_backend("triton", dtype, inputs, **options)
    before = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
              for p in params]
    values = [p.detach().clone() for p in params]
    for p, g in zip(params, inputs.grads[0]):
        p.grad = as_torch(g, dtype, "cpu")
    opt.step(torch.tensor(float("nan")))
    for p, v, state in zip(params, values, before):
        assert_bitwise(p.detach().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       v.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        for key, old in state.items():
            new = opt.state[p][key]
            if key == "skipped_steps":  # the one thing a skipped step counts
                assert new == old + 1
                continue
            assert torch.equal(new.reshape(-1).view(torch.uint8),
                               old.reshape(-1).view(torch.uint8)), key


# ------------------------------------------------------------------------------ the op


def op_args(sizes=(4096, 2048 * 2 + 300)):
    """triton_step_'s arguments for a bucket of 8-bit moments."""
    from adaml_kernels.buckets import Bucket
    from adaml_kernels.hyperparams import Hyperparams
    from adaml_kernels.loss import StepInputs

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(k, generator=g) for k in sizes]
    moments = [quant8.encode(torch.randn(k, generator=g), quant8.EXP_AVG_MAP) for k in sizes]
    moments_sq = [quant8.encode(torch.rand(k, generator=g), quant8.EXP_AVG_SQ_MAP)
                  for k in sizes]
    scales = [s for _, s in moments] + [s for _, s in moments_sq]
    bucket = Bucket(params, [torch.randn(k, generator=g) for k in sizes],
                    [c for c, _ in moments], [c for c, _ in moments_sq],
                    [torch.tensor(3.0) for _ in sizes], moment_scales=scales)
    hp = Hyperparams(lr=0.01, weight_decay=0.1)
    inputs = StepInputs(torch.tensor(1.5), torch.tensor(1.0), None, None)
    return list(bucket.fused_op_args(hp, inputs))


@needs_triton
def test_the_op_updates_copies_of_the_codes_and_scales_not_the_tables_tensors():
    # Under torch.compile the op may receive copies: it rebuilds the table, scales included.
    args, direct = op_args(), op_args()
    moved = (0, 2, 3, 6)  # params, exp_avgs, exp_avg_sqs, moment_scales
    originals = {i: [t.clone() for t in args[i]] for i in moved}
    copies = list(args)
    for i in moved:
        copies[i] = [t.clone() for t in args[i]]
    torch.ops.adaml_kernels.triton_step_(*copies)
    torch.ops.adaml_kernels.triton_step_(*direct)
    for i in moved:
        assert all(torch.equal(a, b) for a, b in zip(args[i], originals[i]))
        assert all(torch.equal(a, b) for a, b in zip(copies[i], direct[i]))
    for i in (0, 2, 3):
        assert not any(torch.equal(a, b) for a, b in zip(copies[i], originals[i]))


@needs_triton
def test_the_op_checks_the_block_scales():
    args = op_args()
    for bad in ([], args[6][:3], [s.double() for s in args[6]],
                [s[:-1] for s in args[6]], [s.repeat(2)[::2] for s in args[6]]):
        with pytest.raises(ValueError, match="scale"):
            torch.ops.adaml_kernels.triton_step_(*args[:6], bad, *args[7:])
