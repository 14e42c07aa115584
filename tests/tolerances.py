"""How far a backend may land from the float64 evaluation of SPEC.md (tests/oracle.py).

Errors are normwise: max |x - oracle| / max |oracle| over a tensor, for the parameters and both
moments, after several steps.

Every backend computes in float32 (float64 for float64 parameters), so it cannot match the
oracle exactly. As in flash-attention's tests, the allowance is measured, not guessed: the
reference backend runs the same steps in the same dtype, and a fused backend may be at most
ERROR_FACTOR times as far from the oracle as the reference is, plus FLOOR[dtype].
"""

import torch

# The fused kernels fold the per-step scalars differently (float64 coefficients, then one
# float32 multiply) than the reference's literal formula: an equally valid rounding sequence,
# whose error has the same size but lands on other elements.
ERROR_FACTOR = 2.0

# Room for rounding that the reference happened not to show: a few units in the last place of
# the largest value, so that a single unlucky element does not fail the test.
FLOOR = {
    torch.float64: 2.0**-48,  # ~16 ulp: long sums of float64 products
    torch.float32: 2.0**-21,  # 4 ulp of float32
    torch.float16: 2.0**-10,  # 1 ulp of float16 near the top of the range
    torch.bfloat16: 2.0**-7,  # 1 ulp of bfloat16 near the top of the range
}

# The reference backend itself is held to fixed bounds, from its arithmetic: per step a handful
# of float32 roundings (~1e-7 each) on the moments, compounded over 8 steps and amplified where
# w is small; for half types the parameter is the oracle's own rounded value but for elements
# where float32 and float64 results straddle a rounding boundary (off by one ulp).
REFERENCE_BOUND = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2.0**-9,
    torch.bfloat16: 2.0**-6,
}

# Half types: an element that differs from the oracle's rounded value at all must be rare. The
# reference shows how rare; wrong rounding (e.g. truncation) makes about half of them differ.
MISMATCH_FACTOR = 2.0
MISMATCH_FLOOR = 0.01


def allowed_error(dtype: torch.dtype, reference_error: float) -> float:
    return ERROR_FACTOR * reference_error + FLOOR[dtype]


def allowed_mismatch(reference_mismatch: float) -> float:
    return MISMATCH_FACTOR * reference_mismatch + MISMATCH_FLOOR

# Stochastic rounding's statistics (tests/test_precision.py): the mean rounding error and the
# mean squared error over many elements, as z-scores against what exact stochastic rounding
# gives (a sum of independent Bernoulli trials). |z| < 5 fails a correct rounding about once in
# 1.7 million runs; round-to-nearest and truncation at f = 0.3 give |z| = 0.65 sqrt(n): 42 for the
# 4,096 elements of the Triton interpreter's runs, 168 for 65,536.
SR_MAX_Z = 5.0

# float32 parameters stepped with bf16 moments (state_dtype=torch.bfloat16): where float32 and
# float64 round a moment to neighbouring bf16 values (a few elements per thousand and step), the
# parameter's step differs by up to 2^-8 of itself, lr * 2^-8 ~ 4e-5 with the tests' lr = 1e-2,
# and that difference stays. Half-type parameters keep their own, coarser bounds above.
REFERENCE_BOUND_WITH_BF16_MOMENTS = {torch.float32: 1e-4}

# 8-bit moments (tests/test_quant8.py). A backend's float32 moment and the oracle's float64 one
# round to neighbouring codes where they straddle a rounding boundary between codes (a few
# elements per 100,000 and step): that element's moment is then one code step, at most 2^-3 of
# its block's largest value, off. The step after it moves that parameter by up to ~lr/8 more or
# less, 1.25e-3 with the tests' lr = 1e-2, against parameters of about 4: 2^-11 normwise.
QUANT8_MOMENT_BOUND = 2.0**-3
QUANT8_PARAM_BOUND = {torch.float32: 2.0**-11, torch.bfloat16: 2.0**-6}
# The share of 8-bit moments that may differ from the oracle's. A wrong map, scale or rounding
# changes most of them. With float32 gradients a float32-vs-float64 flip is rare (none seen in
# 8 steps of 21k elements). With bf16 gradients, b1 m + (1 - b1) g of a 4-bit m and an 8-bit g
# often lands exactly on a tie between codes in float64, which float32's rounded b1 misses:
# about 0.15% of the elements per step, 0.9% after 8 steps.
QUANT8_MISMATCH = {torch.float32: 0.001, torch.bfloat16: 0.02}
QUANT8_MISMATCH_FLOOR = 0.001
# Stochastically rounded codes, QUANT8_DRAWS draws of a block of QUANT8_DRAWS_BLOCK values
# between codes: each draw is one of two codes at most 2^-3 of the value apart, so the mean of
# the draws is within (2^-3 / 2) / sqrt(draws) = 0.3% of the value (one sigma) at worst;
# 1.6% is five sigma, and a quarter of rounding to nearest's worst bias (2^-4), of which the
# test's values reach 5%.
QUANT8_DRAWS = 400
QUANT8_DRAWS_BLOCK = 256
QUANT8_SR_BIAS = 0.016
# An EMA (b2 = 0.999, 3000 steps) through stochastic codes. Each step rounds w's change (about
# 0.1% of w) up or down to a code, 2^-3 of w apart: an unbiased error that w carries on. Over
# 256 elements the decoded w has a spread of 6.5% (seen at 3000 steps); the median of 256 such
# is within 1.25 * 6.5% / 16 = 0.5% (one sigma) of the exact EMA. 2.5% is five sigma.
# (Rounding to nearest stalls at w < x / 64: the median is then 0.025 of it.)
QUANT8_SR_EMA = 0.025

# Telemetry (tests/test_telemetry.py): update_rms against the float64 evaluation of the same step.
# A float32 parameter's new value is rounded once more than the oracle's (an ulp of p against a
# change of about lr = 1e-2 of it: 1e-5 relative), and the kernels sum squares in float32 per
# chunk of 2048 (at most ~1e-4 relative, typically far less): 2e-4 relative on the mean square.
# Counts are exact up to the oracle's `ambiguous_*` elements, whose outcome float32 decides.
TELEMETRY_MEAN_SQUARE_RTOL = 2e-4
