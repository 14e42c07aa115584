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
