"""SPEC.md evaluated in float64 with NumPy: the yardstick every backend is measured against.

Written straight from the spec, independently of the package's code. Parameters stored in a
half type are rounded (to nearest, ties to even) on store, as the spec says; everything else
stays in float64, except that w saturates at the largest finite value of the moment dtype.

Each step also leaves, per parameter stepped, its telemetry (SPEC.md, Telemetry) in
`ParamState.figures`: counts and the sum of squared changes in float64, and for each count the
number of elements whose outcome float32 arithmetic could decide either way (`ambiguous_*`).

The low-precision modes (SPEC.md, Precision; docs/low_precision.md defines the hash):
a float32 master weight is the float32 rounding of the new value and the stored parameter is
rounded from it; bf16 moments are rounded on store (the step uses the unrounded values, as the
kernels do) and saturate at bf16's largest value; under stochastic rounding a value is first
rounded to float32, then 16 random bits are added to the low half of its bit pattern and the
result truncated. The hash is written here again, in NumPy, from docs/low_precision.md's definition. 8-bit moments
hold the values quantize_8bit gives, written from the maps' definition on values, not bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

L_MIN = 1e-12
FLOAT32_MAX = float(np.finfo(np.float32).max)
BFLOAT16_MAX = 3.3895313892515355e38  # 0x7F7F

# Significand bits (with the implicit one) and smallest subnormal step of each storage type.
_STORAGE = {"float16": (11, 2.0**-24), "bfloat16": (8, 2.0**-133)}


def round_to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to the nearest value of `dtype`, ties to even."""
    if dtype not in _STORAGE:
        return x if dtype == "float64" else x.astype(np.float32).astype(np.float64)
    bits, smallest = _STORAGE[dtype]
    _, exponent = np.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    ulp = np.maximum(np.ldexp(1.0, exponent - bits), smallest)
    return np.round(x / ulp) * ulp  # np.round rounds half to even


# ------------------------------------------------------------------------- stochastic rounding

def _mix32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    x ^= x >> 15
    return x


def random_bits(seed: int, k: int, j: int, n: int, offset: int = 0) -> np.ndarray:
    """32 bits per element i = offset .. offset + n - 1 of parameter j at step count k."""
    h = _mix32(np.array([(seed & 0xFFFFFFFF) ^ 0x9E3779B9], dtype=np.uint64))
    h = _mix32(h ^ np.uint64(seed >> 32))
    h = _mix32(h ^ np.uint64(k))
    key = _mix32(h ^ np.uint64(j))
    i = np.arange(offset, offset + n, dtype=np.uint64)
    return _mix32(_mix32(key ^ (i & np.uint64(0xFFFFFFFF))) ^ (i >> np.uint64(32)))


def round_bf16_stochastic(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """float64 -> float32 (nearest) -> bf16 by adding the low 16 of `bits` and truncating."""
    raw = np.asarray(x, dtype=np.float64).astype(np.float32).view(np.uint32).astype(np.uint64)
    out = ((raw + (bits & np.uint64(0xFFFF))) >> np.uint64(16)) << np.uint64(16)
    return out.astype(np.uint32).view(np.float32).astype(np.float64)


def store(x: np.ndarray, dtype: str, bits: np.ndarray | None) -> np.ndarray:
    if bits is not None and dtype == "bfloat16":
        return round_bf16_stochastic(x, bits)
    return round_to_storage(x, dtype)


@dataclass
class Hyper:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    gamma: float = 1.0
    phi: float = 1.0
    loss_offset: float = 0.0
    normalize_loss: bool = False
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False

    def optimizer_kwargs(self) -> dict:
        kw = dict(self.__dict__)
        kw["betas"] = (kw.pop("beta1"), kw.pop("beta2"))
        return kw


@dataclass
class ParamState:
    p: np.ndarray
    m: np.ndarray = None
    w: np.ndarray = None
    k: int = 0
    storage: str = "float32"
    moments: str = "float32"  # the moments' storage: float32, bfloat16, uint8 (or float64)
    master: np.ndarray | None = None  # float32 master weight (master_weights)
    index: int = 0  # the parameter's index in the optimizer
    figures: dict | None = None  # the telemetry of its last step (see the module docstring)

    def __post_init__(self):
        self.m = np.zeros_like(self.p) if self.m is None else self.m
        self.w = np.zeros_like(self.p) if self.w is None else self.w


@dataclass
class Oracle:
    """Runs SPEC.md steps on a list of parameters, in float64."""

    hp: Hyper
    params: list[ParamState] = field(default_factory=list)
    skipped: int = 0
    f1: float = math.nan  # one value for the whole optimizer
    stochastic_rounding: bool = False
    seed: int = 0

    def step(self, grads: list[np.ndarray | None], loss: float, grad_scale: float | None = None,
             found_inf: bool = False) -> None:
        h = self.hp
        if all(g is None for g in grads):  # no gradient anywhere: nothing happens
            return
        if not math.isfinite(loss) or found_inf:  # 0. skip
            self.skipped += 1
            return
        if math.isnan(self.f1):  # the loss of the optimizer's first step taken
            self.f1 = loss
        # 1. scaled loss
        scale = max(self.f1 - h.loss_offset, L_MIN) if h.normalize_loss else 1.0
        l = max((loss - h.loss_offset) / scale, L_MIN)
        for st, g in zip(self.params, grads):
            if g is None:  # parameters without a gradient are not stepped
                continue
            # 2.
            st.k += 1
            # 3.
            g = g.astype(np.float64)
            p = st.p if st.master is None else st.master
            stored_before, before = st.p, p
            if h.maximize:
                g = -g
            if grad_scale is not None:
                g = g / grad_scale
            if h.weight_decay > 0 and not h.decoupled_weight_decay:
                g = g + h.weight_decay * p
            if h.weight_decay > 0 and h.decoupled_weight_decay:
                p = p * (1 - h.lr * h.weight_decay)
            # 4-5.
            m = h.beta1 * st.m + (1 - h.beta1) * g
            adaptive, non_adaptive = (1 - h.beta2) * g**2 / (h.gamma * l**h.phi), h.eps * l
            w = h.beta2 * st.w + adaptive + non_adaptive
            w_exact = w
            if st.storage != "float64":  # float32 moments saturate (SPEC.md, Precision)
                w = np.minimum(w, FLOAT32_MAX)
            # 6-7.
            m_hat = m / (1 - h.beta1**st.k)
            w_hat = w / (1 - h.beta2**st.k)
            with np.errstate(divide="ignore", invalid="ignore"):
                quotient = np.where(w_hat == 0, 0.0, m_hat / np.sqrt(w_hat))
            p = p - h.lr * quotient
            # Each value rounded once on store (stochastically where it is stored as bf16).
            bits = None
            if self.stochastic_rounding:
                bits = random_bits(self.seed, st.k, st.index, p.size).reshape(p.shape)
            if st.master is not None:
                st.master = round_to_storage(p, "float32")
                p = st.master
            st.p = store(p, st.storage, bits)
            st.figures = _figures(st, stored_before, before, p, bits, adaptive, non_adaptive,
                                  w_exact)
            m_bits = w_bits = None
            if bits is not None:
                m_bits, w_bits = bits >> np.uint64(16), _mix32(bits ^ np.uint64(0x6A09E667))
            if st.moments == "bfloat16":
                m = np.clip(m, -BFLOAT16_MAX, BFLOAT16_MAX)
                w = np.minimum(w, BFLOAT16_MAX)
            if st.moments == "uint8":  # 8-bit moments: the step used the values before this
                m_random = w_random = None
                if bits is not None:  # the codes' random bits (20 each): see code_bits
                    m_random = w_bits >> np.uint64(12)
                    w_random = _mix32(w_bits ^ np.uint64(0x6A09E667)) >> np.uint64(12)
                st.m = quantize_8bit(m, signed=True, random=m_random)
                st.w = quantize_8bit(w, signed=False, random=w_random)
                continue
            st.m = m if st.moments != "bfloat16" else store(m, "bfloat16", m_bits)
            st.w = w if st.moments != "bfloat16" else store(w, "bfloat16", w_bits)


# ------------------------------------------------------------------------- telemetry

# How close to its threshold an outcome must be for float32 arithmetic to decide it either way.
_AMBIGUOUS = 1e-5
_F32_ULP = 2.0**-23


def _figures(st: ParamState, stored_before, before, after, bits, adaptive, non_adaptive,
             w_exact) -> dict:
    """SPEC.md, Telemetry, of one parameter's step: `stored_before` and st.p are the parameter
    as stored before and after, `before` and `after` the values the update read and computed
    (the master weight's, if any), w_exact the new w before saturating."""
    top = {"bfloat16": BFLOAT16_MAX, "float64": math.inf}.get(st.moments, FLOAT32_MAX)
    out = dict(elements=st.p.size)
    out["sgd_like"] = int(np.sum(non_adaptive >= adaptive))
    out["ambiguous_sgd_like"] = int(np.sum(
        np.abs(non_adaptive - adaptive) <= _AMBIGUOUS * np.maximum(non_adaptive, adaptive)))
    with np.errstate(over="ignore", invalid="ignore"):
        out["saturated"] = int(np.sum(w_exact > top))
        out["ambiguous_saturated"] = int(np.sum(np.abs(w_exact - top) <= _AMBIGUOUS * top))
    change = st.p - stored_before
    out["squared_change"] = float(np.sum(change * change))
    out["lost"] = out["ambiguous_lost"] = 0
    out["squared_change_slack"] = 0.0  # what rounding ambiguities may add or take away
    if st.storage in _STORAGE:  # fp16/bf16: a nonzero update whose stored value stayed
        update = after - before
        out["lost"] = int(np.sum((update != 0) & (st.p == stored_before)))
        # float32 arithmetic may round the new value to either side of a rounding boundary,
        # and an update below float32's resolution of the value to zero
        delta = _AMBIGUOUS * np.abs(update) + 2 * _F32_ULP * np.abs(after)
        low, high = store(after - delta, st.storage, bits), store(after + delta, st.storage, bits)
        out["ambiguous_lost"] = int(np.sum((low != high) | (np.abs(update) <= delta)))
        either = low != high  # stored one step either way: the change by up to that step
        out["squared_change_slack"] = float(np.sum(
            ((np.abs(change) + np.abs(high - low)) ** 2)[either]))
    return out


# ------------------------------------------------------------------------- 8-bit moments

def quantize_8bit(x: np.ndarray, signed: bool, random: np.ndarray | None = None) -> np.ndarray:
    """The values 8-bit moments hold for x (docs/low_precision.md), computed on values rather
    than bits: x is rounded to float32 (the kernels encode float32 values), cut into blocks of
    256 consecutive elements, each block scaled by 2^S, S = ceil(log2(absmax)) clamped to
    [S_MIN, 127]; each value keeps 3 mantissa bits below its power of two, or a fixed step of
    2^(-bias-2) below 2^(1-bias), rounded to nearest even and saturated at 1.75; a positive w
    never becomes 0. exp_avg: signed, bias 15, S_MIN -109; exp_avg_sq: bias 31, S_MIN -93.
    With `random` (integers below 2^20, one per element) it rounds stochastically instead: the
    value in steps, its fraction truncated to 20 bits, plus random / 2^20, rounded down."""
    bias, s_min = (15, -109) if signed else (31, -93)
    x32 = np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64).ravel()
    r = None if random is None else np.asarray(random, dtype=np.float64).ravel() / 2.0**20
    out = np.empty_like(x32)
    for start in range(0, x32.size, 256):
        block = x32[start:start + 256]
        magnitude = np.where(np.isnan(block), 0.0, np.abs(block))
        absmax = magnitude.max()
        s = s_min if absmax == 0 else int(np.clip(math.ceil(math.log2(absmax)), s_min, 127))
        y = magnitude / 2.0**s
        e = np.floor(np.log2(np.where(y > 0, y, 1.0)))
        e = np.maximum(e, 1 - bias)  # the fixed-step range below the smallest normal
        step = 2.0 ** (e - 3)
        if r is None:
            q = np.round(y / step)  # half to even
        else:
            q = np.floor(np.floor(y / step * 2.0**20) / 2.0**20 + r[start:start + 256])
        q = np.minimum(q * step, 1.75)
        if not signed:
            q = np.where((q == 0) & (magnitude > 0), 2.0 ** (-bias - 2), q)
        out[start:start + 256] = np.where(np.isnan(block), np.nan, np.copysign(q, block) * 2.0**s)
    return out.reshape(np.shape(x))
