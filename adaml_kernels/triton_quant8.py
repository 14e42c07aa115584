"""The 8-bit moments' block quantizer (quant8.py) in Triton: the helpers the step kernel
(triton_kernel.py) uses, and entry points that run them alone, for the tests.

The third copy of the quantizer (quant8.py holds the torch one, csrc/adaml_quant8.h the C++ one),
written, as they are, in integer operations on the float32 bits with power-of-two scales: no
division by the scale and no log2, so every backend gives bitwise the same codes and scales.
Values are handled as (blocks, QUANT_BLOCK) tiles: a row is a block, its scale is one per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import quant8
from .layout import QUANT_BLOCK as _QUANT_BLOCK

QUANT_BLOCK = tl.constexpr(_QUANT_BLOCK)
EXP_AVG_MAP = tl.constexpr(quant8.EXP_AVG_MAP)
EXP_AVG_SQ_MAP = tl.constexpr(quant8.EXP_AVG_SQ_MAP)
MANTISSA_BITS = tl.constexpr(quant8.MANTISSA_BITS)
RANDOM_BITS = tl.constexpr(quant8.RANDOM_BITS)
CODE_MANTISSA = tl.constexpr((1 << quant8.MANTISSA_BITS) - 1)
SCALE_EXPONENT_MAX = tl.constexpr(quant8.SCALE_EXPONENT_MAX)
# Each map's exponent bias, smallest scale exponent and largest finite code (quant8._FORMATS).
_, _M_EXP_BITS, _M_BIAS, _M_S_MIN = quant8._FORMATS[quant8.EXP_AVG_MAP]
_, _W_EXP_BITS, _W_BIAS, _W_S_MIN = quant8._FORMATS[quant8.EXP_AVG_SQ_MAP]
EXP_AVG_BIAS = tl.constexpr(_M_BIAS)
EXP_AVG_SQ_BIAS = tl.constexpr(_W_BIAS)
EXP_AVG_S_MIN = tl.constexpr(_M_S_MIN)
EXP_AVG_SQ_S_MIN = tl.constexpr(_W_S_MIN)
EXP_AVG_TOP = tl.constexpr((1 << (_M_EXP_BITS + quant8.MANTISSA_BITS)) - 2)
EXP_AVG_SQ_TOP = tl.constexpr((1 << (_W_EXP_BITS + quant8.MANTISSA_BITS)) - 2)
EXP_AVG_NAN = tl.constexpr(0x7F)  # the signed map's NaN code carries no sign
EXP_AVG_SQ_NAN = tl.constexpr(0xFF)
SIGN_BIT = tl.constexpr(0x80)
FLOAT_MAGNITUDE = tl.constexpr(0x7FFFFFFF)
FLOAT_INF = tl.constexpr(0x7F800000)
FLOAT_MANTISSA = tl.constexpr(0x7FFFFF)
FLOAT_HIDDEN_BIT = tl.constexpr(0x800000)
FLOAT_NAN = tl.constexpr(0x7FC00000)
BLOCKS_PER_PROGRAM = 8  # the test entry points' tile: as many blocks as a step kernel's chunk


@triton.jit
def magnitude_bits(x):
    """|x|'s bits as int32, a NaN as 0: their integer maximum is the bits of the absmax."""
    mag = x.to(tl.int32, bitcast=True) & FLOAT_MAGNITUDE
    return tl.where(mag > FLOAT_INF, 0, mag)


@triton.jit
def block_scale_exponents(x, mask, MAP: tl.constexpr):
    """S of each row of the float32 tile x (int32, one per row); elements off `mask` count as 0
    (a None mask: all count)."""
    S_MIN: tl.constexpr = EXP_AVG_S_MIN if MAP == EXP_AVG_MAP else EXP_AVG_SQ_S_MIN
    mag = magnitude_bits(x)
    if mask is not None:
        mag = tl.where(mask, mag, 0)
    absmax = tl.max(mag, axis=1)
    # ceil(log2(absmax)); a zero or subnormal absmax gives at most -126 (below S_MIN)
    ceil_log2 = (absmax >> 23) - 127 + ((absmax & FLOAT_MANTISSA) != 0).to(tl.int32)
    return tl.minimum(tl.maximum(ceil_log2, S_MIN), SCALE_EXPONENT_MAX)


@triton.jit
def scale_of(s):
    """2^s as float32, exactly (s is a normal float32's exponent)."""
    return ((s + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def exponent_of_scale(scale):
    return (scale.to(tl.int32, bitcast=True) >> 23) - 127


@triton.jit
def encode8(x, s, random, MAP: tl.constexpr):
    """The uint8 codes of the float32 values x in blocks of scale 2^s (s broadcast against x),
    rounded to nearest even (random None: adaml_quant8.h encode8, step by step) or
    stochastically with `random`, RANDOM_BITS random bits per element as int32 (quant8.encode:
    the bits below the code's last, truncated, plus random, carry into the code)."""
    BIAS: tl.constexpr = EXP_AVG_BIAS if MAP == EXP_AVG_MAP else EXP_AVG_SQ_BIAS
    TOP: tl.constexpr = EXP_AVG_TOP if MAP == EXP_AVG_MAP else EXP_AVG_SQ_TOP
    NAN: tl.constexpr = EXP_AVG_NAN if MAP == EXP_AVG_MAP else EXP_AVG_SQ_NAN
    b = x.to(tl.int32, bitcast=True)
    mag = b & FLOAT_MAGNITUDE
    field = mag >> 23
    significand = tl.where(field > 0, (mag & FLOAT_MANTISSA) | FLOAT_HIDDEN_BIT,
                           mag & FLOAT_MANTISSA)
    exponent = tl.maximum(field, 1) - 127
    # The value's exponent relative to the scale, at least the smallest normal code's.
    target = tl.maximum(exponent - s, 1 - BIAS)
    shift = 23 + s + target - MANTISSA_BITS - exponent  # at least RANDOM_BITS
    if random is None:
        shift = tl.minimum(shift, 25)
        q = significand >> shift
        rest = significand - (q << shift)
        half = 1 << (shift - 1)
        q += ((rest > half) | ((rest == half) & ((q & 1) == 1))).to(tl.int32)
    else:
        kept = significand >> tl.minimum(shift - RANDOM_BITS, 31)
        q = (kept + random) >> RANDOM_BITS
    code = tl.minimum(((target + BIAS - 1) << MANTISSA_BITS) + q, TOP)  # saturates
    if MAP == EXP_AVG_MAP:
        code = tl.where((code != 0) & (b < 0), code | SIGN_BIT, code)
    else:
        code = tl.where((code == 0) & (mag != 0), 1, code)  # a w > 0 never decodes to 0
    return tl.where(mag > FLOAT_INF, NAN, code).to(tl.uint8)


@triton.jit
def decode8(c, s, MAP: tl.constexpr):
    """The float32 values of the uint8 codes c in blocks of scale 2^s (exact: normal or 0)."""
    BIAS: tl.constexpr = EXP_AVG_BIAS if MAP == EXP_AVG_MAP else EXP_AVG_SQ_BIAS
    NAN: tl.constexpr = EXP_AVG_NAN if MAP == EXP_AVG_MAP else EXP_AVG_SQ_NAN
    code = c.to(tl.int32)
    mag = code
    if MAP == EXP_AVG_MAP:
        mag = code & (SIGN_BIT - 1)
    e = mag >> MANTISSA_BITS
    f = mag & CODE_MANTISSA
    normal = ((tl.maximum(e - BIAS + s + 127, 1) << 23) | (f << (23 - MANTISSA_BITS))).to(
        tl.float32, bitcast=True)
    small = f.to(tl.float32) * scale_of(s + (1 - BIAS - MANTISSA_BITS))
    value = tl.where(e > 0, normal, small)
    if MAP == EXP_AVG_MAP:
        value = tl.where(code >= SIGN_BIT, -value, value)
    return tl.where(mag == NAN, tl.full(value.shape, FLOAT_NAN, tl.int32).to(
        tl.float32, bitcast=True), value)


@triton.jit
def load_blocks(codes_ptr, scales_ptr, offs, mask, block_mask, MAP: tl.constexpr):
    """The float32 tile at codes_ptr + offs, its rows' scales at scales_ptr (one per row);
    elements off `mask` are undefined (the caller stores none of them)."""
    rows = tl.arange(0, offs.shape[0])
    s = exponent_of_scale(tl.load(scales_ptr + rows, mask=block_mask))
    return decode8(tl.load(codes_ptr + offs, mask=mask), s[:, None], MAP)


@triton.jit
def store_blocks(x, codes_ptr, scales_ptr, offs, mask, block_mask, random, MAP: tl.constexpr):
    """Encode the float32 tile x at codes_ptr + offs (rounded as encode8 with `random`), each
    row's scale (from its values where `mask`) at scales_ptr; rows off `block_mask` (no valid
    element) store no scale."""
    s = block_scale_exponents(x, mask, MAP)
    tl.store(scales_ptr + tl.arange(0, x.shape[0]), scale_of(s), mask=block_mask)
    tl.store(codes_ptr + offs, encode8(x, s[:, None], random, MAP), mask=mask)


@triton.jit
def _tile(n, BLOCKS: tl.constexpr):
    """This program's (BLOCKS, QUANT_BLOCK) tile of a tensor of n elements: the offsets, their
    mask, its first block and its blocks' mask."""
    first = tl.program_id(0).to(tl.int64) * BLOCKS
    rows = first + tl.arange(0, BLOCKS)
    offs = rows[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :]
    return offs, offs < n, first, rows * QUANT_BLOCK < n


@triton.jit
def _quantize_kernel(x_ptr, random_ptr, codes_ptr, scales_ptr, n, MAP: tl.constexpr,
                     STOCHASTIC: tl.constexpr, BLOCKS: tl.constexpr):
    offs, mask, first, block_mask = _tile(n, BLOCKS)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    random = None
    if STOCHASTIC:
        random = tl.load(random_ptr + offs, mask=mask, other=0)
    store_blocks(x, codes_ptr, scales_ptr + first, offs, mask, block_mask, random, MAP)


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, x_ptr, n, MAP: tl.constexpr,
                       BLOCKS: tl.constexpr):
    offs, mask, first, block_mask = _tile(n, BLOCKS)
    x = load_blocks(codes_ptr, scales_ptr + first, offs, mask, block_mask, MAP)
    tl.store(x_ptr + offs, x, mask=mask)


def _grid(n: int) -> tuple[int]:
    return (max(1, triton.cdiv(quant8.num_blocks(n), BLOCKS_PER_PROGRAM)),)


def quantize_8bit_triton(values: torch.Tensor, map: int, random: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (uint8, values' shape) and block scales (float32) of the contiguous float32
    tensor `values` under code map `map` (quant8.EXP_AVG_MAP or EXP_AVG_SQ_MAP), rounded
    stochastically with `random` (int32 below 2^RANDOM_BITS, values' shape) if given, computed
    by the step kernel's Triton helpers: for testing them against quant8.encode."""
    if values.dtype != torch.float32 or not values.is_contiguous():
        raise ValueError("quantize_8bit_triton: values must be contiguous float32")
    if random is not None and (random.dtype != torch.int32 or random.shape != values.shape
                               or not random.is_contiguous()):
        raise ValueError("quantize_8bit_triton: random must be contiguous int32, values' shape")
    n = values.numel()
    codes = torch.empty(values.shape, dtype=torch.uint8, device=values.device)
    scales = torch.empty(quant8.num_blocks(n), dtype=torch.float32, device=values.device)
    if n:
        _quantize_kernel[_grid(n)](values, values if random is None else random, codes,
                                   scales, n, MAP=map, STOCHASTIC=random is not None,
                                   BLOCKS=BLOCKS_PER_PROGRAM)
    return codes, scales


def dequantize_8bit_triton(codes: torch.Tensor, scales: torch.Tensor, map: int) -> torch.Tensor:
    """The float32 values of contiguous uint8 `codes` under their block `scales` (as
    quant8.decode), by the step kernel's Triton helpers."""
    if codes.dtype != torch.uint8 or not codes.is_contiguous():
        raise ValueError("dequantize_8bit_triton: codes must be contiguous uint8")
    n = codes.numel()
    if scales.shape != (quant8.num_blocks(n),) or scales.dtype != torch.float32:
        raise ValueError("dequantize_8bit_triton: one float32 scale per block of codes")
    values = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    if n:
        _dequantize_kernel[_grid(n)](codes, scales.contiguous(), values, n, MAP=map,
                                     BLOCKS=BLOCKS_PER_PROGRAM)
    return values
