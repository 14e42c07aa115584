"""Low precision (SPEC.md, Precision; docs/low_precision.md): the options, and stochastic
rounding written in torch ops for the reference backend.

    stochastic_rounding  values stored as bf16 (parameters, bf16 moments) or as 8-bit codes
                         are rounded stochastically: E[stored] = the float32 value
    master_weights       fp16/bf16 parameters get a float32 copy in the state ("master_param")
    state_dtype          the moments' dtype: None (float32), torch.bfloat16, or torch.uint8
                         for 8-bit block-quantized moments (quant8.py)
    seed                 the random bits' seed (an int in [0, 2**64))

The random bits are a counter-based hash of (seed, k, j, i): k the parameter's step count, j its
index in the optimizer, i the element's index in the whole parameter. The same function is
written once for C++/CUDA (csrc/adaml_update.h, "random bits"), once in the Triton kernel and
here; every backend rounds bitwise alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .buckets import is_dense
from .layout import MIX_1, MIX_2, SEED_SALT, SQ_STREAM

HALF = (torch.float16, torch.bfloat16)
STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.uint8)
MASTER_KEY = "master_param"  # the state key of a master weight

_MASK32 = 0xFFFFFFFF
BFLOAT16_MAX = float(torch.finfo(torch.bfloat16).max)


@dataclass(frozen=True)
class Precision:
    """The optimizer's low-precision options (validated on construction)."""

    stochastic_rounding: bool = False
    master_weights: bool = False
    state_dtype: torch.dtype | None = None
    seed: int = 0

    def __post_init__(self):
        validate_precision(self.stochastic_rounding, self.master_weights, self.state_dtype,
                           self.seed)

    @property
    def default(self) -> bool:
        """Whether nothing differs from plain AdamL (float32 moments, rounding to nearest)."""
        return not (self.stochastic_rounding or self.master_weights) and self.state_dtype in (
            None, torch.float32)

    def has_master(self, param_dtype: torch.dtype) -> bool:
        return self.master_weights and param_dtype in HALF


def rounds_stochastically(stochastic_rounding: bool, param_dtype: torch.dtype,
                          moment: torch.dtype) -> bool:
    """Whether a bucket draws random bits: under stochastic rounding, something of it is stored
    as bf16 or as 8-bit codes (the C++ kernels decide alike, adaml_update.h dispatch_config)."""
    return stochastic_rounding and (
        torch.bfloat16 in (param_dtype, moment) or moment == torch.uint8)


def validate_precision(stochastic_rounding, master_weights, state_dtype, seed) -> None:
    """Raise ValueError, naming the argument, for an invalid low-precision option."""
    for name, value in (("stochastic_rounding", stochastic_rounding),
                        ("master_weights", master_weights)):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (must be a bool)")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(
            f"Invalid state_dtype: {state_dtype!r} (must be None, torch.float32, torch.bfloat16 "
            "or torch.uint8 (8-bit moments); float16 moments would underflow, w is about "
            "eps * l)"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"Invalid seed: {seed!r} (must be an int in [0, 2**64))")


# ------------------------------------------------------------------------------ the hash

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """adaml_update.h mix32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_2)
    return x ^ (x >> 15)


def tensor_key(seed: int, k: torch.Tensor, j: int) -> torch.Tensor:
    """The per-tensor key of step count k (a float32 tensor, already advanced) and index j."""
    h = mix32(torch.full_like(k, (seed & _MASK32) ^ SEED_SALT, dtype=torch.int64))
    h = mix32(h ^ ((seed >> 32) & _MASK32))
    h = mix32(h ^ (k.to(torch.int64) & _MASK32))
    return mix32(h ^ (j & _MASK32))


def element_bits(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """32 random bits per element: index is the element's index in the whole parameter."""
    return mix32(mix32(key ^ (index & _MASK32)) ^ (index >> 32))


def exp_avg_sq_bits(bits: torch.Tensor) -> torch.Tensor:
    return mix32(bits ^ SQ_STREAM)


def code_bits(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The random bits of an element's two 8-bit codes (exp_avg's, exp_avg_sq's): the high
    quant8.RANDOM_BITS of exp_avg_sq_bits(bits) and of the hash of that again, so neither shares
    a bit with the parameter's (the low 16 of bits)."""
    sq = exp_avg_sq_bits(bits)
    return sq >> 12, exp_avg_sq_bits(sq) >> 12


def element_index(p: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Each element's index in the whole parameter: its position in memory order for a dense
    parameter (the order the fused kernels walk), row-major otherwise, plus `offset`."""
    stride = p.stride() if is_dense(p) else torch.empty(p.shape, device="meta").stride()
    index = torch.full(p.shape, offset, dtype=torch.int64, device=p.device)
    for d, (size, st) in enumerate(zip(p.shape, stride)):
        shape = [1] * p.dim()
        shape[d] = size
        index = index + (torch.arange(size, device=p.device) * st).reshape(shape)
    return index


# ------------------------------------------------------------------------------ rounding

def round_bf16_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16: add the low 16 bits of `bits` to the low half of x's bit pattern and
    truncate; NaN becomes the quiet NaN 0x7FC0, inf stays inf."""
    raw = x.view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((raw + (bits & 0xFFFF)) >> 16) & 0xFFFF
    rounded = torch.where(torch.isnan(x), 0x7FC0, rounded)
    return (rounded - ((rounded >> 15) << 16)).to(torch.int16).view(torch.bfloat16)


def store(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor | None) -> torch.Tensor:
    """x (float32 or float64) rounded once to `dtype`: stochastically when bits are given and
    dtype is bf16, else to nearest even."""
    if bits is not None and dtype == torch.bfloat16:
        return round_bf16_stochastic(x, bits)
    return x.to(dtype)


def store_moment(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor | None) -> torch.Tensor:
    """A moment stored as `dtype`; bf16 moments saturate at bf16's largest finite value."""
    if dtype == torch.bfloat16:
        x = x.clamp(-BFLOAT16_MAX, BFLOAT16_MAX)  # NaN stays NaN
    return store(x, dtype, bits)
