"""Awkward inputs for the 8-bit quantizer's tests (test_quant8.py, test_quant8_triton.py)."""

from __future__ import annotations

import torch


def awkward(n: int, seed: int, signed: bool, extremes: bool = False) -> torch.Tensor:
    """Values over many orders of magnitude, with zeros, -0, float32 subnormals, a block of
    zeros, a block of tiny values, a huge value, a NaN and (for n not a multiple of 256) a short
    last block. With `extremes`, also inf, a value that saturates its block, exact rounding ties
    and values around every power of two (n >= 1300)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 8)
    x[3], x[4] = 0.0, -0.0
    x[5:9] = torch.tensor([1e-45, -3e-42, 1e-39, 2e-38])
    x[256:512] = 0.0
    x[512:768] = torch.randn(256, generator=g) * 1e-40
    x[800] = 3e38
    x[1000] = float("nan")
    if extremes:
        x[801] = -3.4e38
        x[1001] = float("inf")
        x[1002] = -float("inf")
        # A block of scale 2 holding ties: halfway between normal codes, and between the codes
        # below 2^-14 (exp_avg) and 2^-30 (exp_avg_sq).
        j = torch.arange(64, dtype=torch.float32)
        x[1024] = 2.0
        x[1025:1089] = (1 + (2 * (j % 8) + 1) / 16) * 2.0 ** -(j // 8)
        x[1089:1153] = (2 * (j % 8) + 1) * 2.0**-17
        x[1153:1217] = (2 * (j % 8) + 1) * 2.0**-33
        x[1217:1281:2] *= -1
        # Values around every power of two from 2^-126 to 2^127, a few per block.
        k = torch.arange(n - 1300, dtype=torch.float32)
        x[1300:] = torch.ldexp(1 + (k % 3) / 4, (k % 254 - 126).to(torch.int32))
        x[1300::7] = x[1300::7] * torch.randn(x[1300::7].shape, generator=g)
    return x if signed else x.abs()
