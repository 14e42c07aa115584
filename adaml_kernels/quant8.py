"""8-bit moments (state_dtype=torch.uint8; SPEC.md, Precision; docs/low_precision.md): the
block quantizer, written in torch integer ops for the reference backend and the tests.

Each tensor's moments are cut into blocks of QUANT_BLOCK consecutive elements (in memory
order; the last block may be shorter). A block has one float32 scale, a power of two:

    scale = 2^S,  S = clamp(ceil(log2(absmax)), S_MIN, 127)

with absmax the largest |x| of the block (NaN counts as 0), so every |x| / scale is at most 1,
and encoding a block's decoded values again gives the same values.
Each element is a small float relative to its block's scale, rounded to nearest even, or,
under stochastic_rounding, stochastically (E[decoded] = the value, below the saturation):

    exp_avg     sign, 4 exponent bits, 3 mantissa bits: |x| / scale = 2^(e - 15) (1 + f/8),
                below 2^-14 in steps of 2^-17; code 0x7F (and 0xFF) is NaN
    exp_avg_sq  no sign, 5 exponent bits, 3 mantissa bits: x / scale = 2^(e - 31) (1 + f/8),
                below 2^-30 in steps of 2^-33; code 0xFF is NaN; a w > 0 that would round to
                0 is stored as code 1, the smallest positive value (it never decodes to 0)

Values above the largest finite code (1.75 · scale: only inf, or a block whose absmax is
above 2^127) saturate there. The scale being a power of two, encoding and decoding are exact
bit operations: every backend computes the same codes and scales from the same float32 values,
whatever its instruction set, fused multiply-adds or flush-to-zero mode. S_MIN keeps every
nonzero decoded value a normal float32.

Worst error of a decoded value, with absmax the block's (or 2^(S_MIN - 1) if that is more):
    exp_avg     relative 2^-4 for |m| >= 2^-13 absmax; absolute 2^-17 absmax below
    exp_avg_sq  relative 2^-4 for w >= 2^-29 absmax; below, absolute 2^-33 absmax, and
                never 0 for w > 0
"""

from __future__ import annotations

import torch

from .layout import MIN_8BIT_NUMEL  # noqa: F401  (smaller tensors: float32 moments)
from .layout import QUANT_BLOCK, QUANT_MANTISSA_BITS, QUANT_RANDOM_BITS

# The two code maps: (sign bit, exponent bits, exponent bias, smallest scale exponent).
EXP_AVG_MAP = 0
EXP_AVG_SQ_MAP = 1
_FORMATS = {EXP_AVG_MAP: (True, 4, 15, -109), EXP_AVG_SQ_MAP: (False, 5, 31, -93)}
MANTISSA_BITS = QUANT_MANTISSA_BITS
RANDOM_BITS = QUANT_RANDOM_BITS  # stochastic rounding's random bits per code
SCALE_EXPONENT_MAX = 127


def num_blocks(numel: int) -> int:
    return -(-numel // QUANT_BLOCK)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """float32 bits as int64 in [0, 2**32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int64)
    return (b - ((b >> 31) << 32)).to(torch.int32).view(torch.float32)


def _pad_blocks(x: torch.Tensor) -> torch.Tensor:
    """x flattened in memory order, zero-padded to whole blocks, as [blocks, QUANT_BLOCK]."""
    flat = _memory_order(x)
    pad = num_blocks(flat.numel()) * QUANT_BLOCK - flat.numel()
    return torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, QUANT_BLOCK)


def scale_exponents(x: torch.Tensor, which: int) -> torch.Tensor:
    """S of each block of the float32 tensor x (int64, one per block)."""
    _, _, _, s_min = _FORMATS[which]
    magnitude = _bits(_pad_blocks(x)) & 0x7FFFFFFF
    magnitude = torch.where(magnitude > 0x7F800000, 0, magnitude)  # NaN counts as 0
    absmax = magnitude.amax(1)
    # ceil(log2(absmax)); a zero or subnormal absmax gives at most -126 (below S_MIN)
    ceil_log2 = (absmax >> 23) - 127 + ((absmax & 0x7FFFFF) != 0).to(torch.int64)
    return ceil_log2.clamp(s_min, SCALE_EXPONENT_MAX)


def encode(x: torch.Tensor, which: int,
           random: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (uint8, x's shape, in x's memory order) and scales (float32, one per block) of
    the float32 tensor x, which is contiguous or dense. With `random` (integers in
    [0, 2^RANDOM_BITS), laid out like x) the codes round stochastically: the RANDOM_BITS bits
    below the kept ones, truncated, plus `random`, carry into the code."""
    signed, exp_bits, bias, _ = _FORMATS[which]
    s = scale_exponents(x, which)
    b = _bits(_pad_blocks(x))
    mag = b & 0x7FFFFFFF
    field = mag >> 23
    significand = torch.where(field > 0, (mag & 0x7FFFFF) | 0x800000, mag & 0x7FFFFF)
    exponent = torch.where(field > 0, field, 1) - 127
    # The value's exponent relative to the scale, at least the smallest normal code's.
    target = torch.maximum(exponent - s[:, None], torch.full_like(exponent, 1 - bias))
    # The significand bits below the code's: RANDOM_BITS for a normal code, more below.
    shift = 23 + s[:, None] + target - MANTISSA_BITS - exponent
    if random is None:
        shift = shift.clamp(max=25)
        q = significand >> shift
        rest = significand - (q << shift)
        half = 1 << (shift - 1)
        q = q + ((rest > half) | ((rest == half) & (q & 1 == 1))).to(torch.int64)
    else:
        kept = significand >> (shift - RANDOM_BITS).clamp(max=31)
        q = (kept + _pad_blocks(random.to(torch.int64))) >> RANDOM_BITS
    code = ((target + bias - 1) << MANTISSA_BITS) + q
    top = (1 << (exp_bits + MANTISSA_BITS)) - 2  # the largest finite code (1.75)
    code = code.clamp(max=top)
    if not signed:
        code = torch.where((code == 0) & (mag > 0), 1, code)  # w > 0 never decodes to 0
    nan = mag > 0x7F800000
    if signed:
        code = torch.where((code != 0) & (b >> 31 == 1), code | 0x80, code)
    code = torch.where(nan, top + 1 if not signed else 0x7F, code)
    codes = code.reshape(-1)[: x.numel()].to(torch.uint8)
    scales = _from_bits((s + 127) << 23)
    return codes.reshape(x.shape) if x.is_contiguous() else _like(codes, x), scales


def decode(codes: torch.Tensor, scales: torch.Tensor, which: int) -> torch.Tensor:
    """The float32 values of `codes` (in memory order) under their blocks' `scales`."""
    signed, exp_bits, bias, _ = _FORMATS[which]
    c = _pad_blocks(codes.to(torch.int64))
    s = ((_bits(scales) >> 23) - 127)[:, None]
    mag = c & 0x7F if signed else c
    e, f = mag >> MANTISSA_BITS, mag & 7
    normal = _from_bits(((e - bias + s + 127).clamp(min=1) << 23) | (f << 20))
    small = f.to(torch.float32) * _from_bits((1 - bias - MANTISSA_BITS + s + 127) << 23)
    value = torch.where(e > 0, normal, small)
    if signed:
        value = torch.where(c >= 0x80, -value, value)
    nan_code = 0x7F if signed else 0xFF
    value = torch.where(mag == nan_code, float("nan"), value)
    flat = value.reshape(-1)[: codes.numel()]
    return flat.reshape(codes.shape) if codes.is_contiguous() else _like(flat, codes)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """The elements of the dense tensor t as a 1-d tensor, in memory order."""
    return t.reshape(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def laid_out_like(values: torch.Tensor, t: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`values` as `dtype` with t's shape, strides and device, so that encoding them cuts the
    blocks of t's memory order."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
    return out.copy_(values)


def _like(flat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`flat` (in t's memory order) as a tensor with t's shape and strides."""
    return flat.as_strided(t.shape, t.stride())


# ------------------------------------------------------------------------------ state

# The state keys of each 8-bit moment's block scales, and its code map.
SCALE_KEYS = {"exp_avg": "exp_avg_scale", "exp_avg_sq": "exp_avg_sq_scale"}
MAPS = {"exp_avg": EXP_AVG_MAP, "exp_avg_sq": EXP_AVG_SQ_MAP}


def zero_scale(which: int) -> float:
    """The scale of a block of zeros (2^S_MIN)."""
    return 2.0 ** _FORMATS[which][3]


class ScaleBuffer:
    """The block scales of some tensors' 8-bit moments in one float32 buffer: every exp_avg
    scale, then every exp_avg_sq scale, each tensor's blocks consecutive; a block of zeros to
    start with."""

    def __init__(self, tensors, device):
        counts = [num_blocks(t.numel()) for t in tensors]
        self.starts = [sum(counts[:i]) for i in range(len(counts))]
        self.counts = counts
        total = sum(counts)
        self.buffer = torch.empty(2 * total, dtype=torch.float32, device=device)
        self.buffer[:total].fill_(zero_scale(EXP_AVG_MAP))
        self.buffer[total:].fill_(zero_scale(EXP_AVG_SQ_MAP))
        self.total = total

    def view(self, name: str, i: int) -> torch.Tensor:
        start = self.starts[i] + (self.total if name == "exp_avg_sq" else 0)
        return self.buffer[start:start + self.counts[i]]


def scales_fit(scale, t: torch.Tensor) -> bool:
    """Whether `scale` is a block-scale tensor for 8-bit moments laid out like t."""
    return isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and \
        scale.device == t.device and scale.shape == (num_blocks(t.numel()),) and \
        scale.is_contiguous()


def decode_moment(codes: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """A moment's float32 values from its codes and block scales (on the codes' device)."""
    return decode(codes, scale.to(codes.device), MAPS[name])


def fill(codes: torch.Tensor, scale: torch.Tensor, source, source_scale, name: str) -> None:
    """Write a moment into `codes` and `scale` (laid out for it): zeros if `source` is None;
    its codes and scales as they are if `source` holds codes laid out alike (a bitwise
    resume); else its values, decoded first if they are codes, encoded in this layout."""
    if source is None:
        codes.zero_()
        scale.fill_(zero_scale(MAPS[name]))
        return
    if source.dtype == torch.uint8:
        if source.stride() == codes.stride() and source.shape == codes.shape and \
                isinstance(source_scale, torch.Tensor) and source_scale.shape == scale.shape:
            codes.copy_(source)
            scale.copy_(source_scale)
            return
        if source_scale is None:
            raise ValueError(f"8-bit {name!r} has no {SCALE_KEYS[name]!r}: cannot decode it")
        source = decode_moment(source, source_scale, name)
    new_codes, new_scale = encode(laid_out_like(source, codes), MAPS[name])
    codes.copy_(new_codes)
    scale.copy_(new_scale)
