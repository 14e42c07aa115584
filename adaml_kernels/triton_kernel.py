"""Triton backend: one fused kernel launch per bucket.

Each program updates one chunk of CHUNK elements of one tensor. It finds its tensor through the
bucket's pointer table (buckets.py), so a bucket of any number of tensors is a single launch and
the parameters stay where the model put them. Per program, the step-dependent scalars (scaled
loss, bias corrections) are computed once in float64; the element-wise update runs in float32
and each array is read and written exactly once. With 8-bit moments (uint8 codes,
quant8.py) a chunk is its blocks of QUANT_BLOCK elements, decoded and encoded by
triton_quant8.py's helpers. With TELEMETRY, each program also sums its chunk's figures
(SPEC.md, Telemetry; layout.Figure) into the chunk's row of the telemetry buffer.

The loss, the step counts and the take/skip flag are read from device memory: the launch needs
no host synchronisation and can be captured in a CUDA graph. On a machine without a GPU the same
kernel runs on CPU tensors under TRITON_INTERPRET=1 (which must be set before this module is
imported).
"""

from __future__ import annotations

import math
import struct
from contextlib import nullcontext
from typing import Optional

import torch
import triton
import triton.language as tl

from .buckets import Bucket, build_table, rows_aligned, table_matches
from .hyperparams import Hyperparams
from .layout import (CHUNK, FIGURES as _FIGURES, L_MIN, MIX_1 as _MIX_1, MIX_2 as _MIX_2,
                     SEED_SALT as _SEED_SALT, SQ_STREAM as _SQ_STREAM, DTYPE_CODES, TABLE_COLUMNS,
                     Column, Config, Figure, Hyper)
from .loss import StepInputs
from .precision import rounds_stochastically
from .quant8 import num_blocks
from .triton_quant8 import EXP_AVG_MAP, EXP_AVG_SQ_MAP, QUANT_BLOCK, load_blocks, store_blocks

_TRITON_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# uint8 moments are 8-bit codes with block scales (quant8.py), not a float dtype.
_MOMENT_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.uint8: tl.uint8}

# Weight-decay modes: they change which arrays feed the update, so they are constexpr.
NO_DECAY = tl.constexpr(0)
L2_DECAY = tl.constexpr(1)
DECOUPLED_DECAY = tl.constexpr(2)
FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
BFLOAT16_MAX = tl.constexpr(3.3895313892515355e38)  # largest finite bf16 (0x7F7F)
# Stochastic rounding's hash (csrc/adaml_update.h, "random bits"): constants as uint32 values.
# layout.py's values, as the compile-time constants a Triton kernel can read.
MIX_1 = tl.constexpr(_MIX_1)
MIX_2 = tl.constexpr(_MIX_2)
SEED_SALT = tl.constexpr(_SEED_SALT)
SQ_STREAM = tl.constexpr(_SQ_STREAM)
PARAM_COLUMN = tl.constexpr(int(Column.PARAM))
GRAD_COLUMN = tl.constexpr(int(Column.GRAD))
EXP_AVG_COLUMN = tl.constexpr(int(Column.EXP_AVG))
EXP_AVG_SQ_COLUMN = tl.constexpr(int(Column.EXP_AVG_SQ))
STEP_COLUMN = tl.constexpr(int(Column.STEP))
MASTER_COLUMN = tl.constexpr(int(Column.MASTER))
NUMEL_COLUMN = tl.constexpr(int(Column.NUMEL))
FIRST_CHUNK_COLUMN = tl.constexpr(int(Column.FIRST_CHUNK))
PARAM_INDEX_COLUMN = tl.constexpr(int(Column.PARAM_INDEX))
ELEMENT_OFFSET_COLUMN = tl.constexpr(int(Column.ELEMENT_OFFSET))
EXP_AVG_SCALE_COLUMN = tl.constexpr(int(Column.EXP_AVG_SCALE))
EXP_AVG_SQ_SCALE_COLUMN = tl.constexpr(int(Column.EXP_AVG_SQ_SCALE))
FIGURES = tl.constexpr(_FIGURES)
SGD_LIKE_FIGURE = tl.constexpr(int(Figure.SGD_LIKE))
SQUARED_CHANGE_FIGURE = tl.constexpr(int(Figure.SQUARED_CHANGE))
LOST_FIGURE = tl.constexpr(int(Figure.LOST))
SATURATED_FIGURE = tl.constexpr(int(Figure.SATURATED))


@triton.jit
def _round_to(x, PARAM: tl.constexpr):
    """float32 -> PARAM, rounding to nearest even."""
    if PARAM == tl.bfloat16:
        # Done on the bits so that every Triton version, and its CPU interpreter (which
        # truncates), rounds the same way: add half an ulp of bf16, ties to even, keep NaN.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(PARAM)


@triton.jit
def _mix32(x):
    """The 32-bit mixer of csrc/adaml_update.h (mix32), on uint32."""
    x = x ^ (x >> 16)
    x = x * MIX_1
    x = x ^ (x >> 15)
    x = x * MIX_2
    x = x ^ (x >> 15)
    return x


@triton.jit
def _store_as(x, bits, DTYPE: tl.constexpr, SR: tl.constexpr):
    """float32 -> DTYPE, rounded once: stochastically with the low 16 bits of `bits` when SR and
    DTYPE is bf16 (adaml_update.h: float_to_bf16_stochastic), else to nearest even."""
    if SR and DTYPE == tl.bfloat16:
        rounded = (x.to(tl.uint32, bitcast=True) + (bits & 0xFFFF)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return _round_to(x, DTYPE)


@triton.jit
def _store_moment(x, bits, MOMENT: tl.constexpr, SR: tl.constexpr):
    """A moment stored as MOMENT; bf16 moments saturate at bf16's largest finite value."""
    if MOMENT == tl.bfloat16:
        x = tl.where(x > BFLOAT16_MAX, BFLOAT16_MAX, tl.where(x < -BFLOAT16_MAX, -BFLOAT16_MAX, x))
    return _store_as(x, bits, MOMENT, SR)


@triton.jit
def _update_values(
    p, g, m, w, grad_scale, beta1, one_minus_beta1, beta2, coef_g2, root_g2, split_g2, coef_eps,
    step_size, weight_decay, decay,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, DECAY_MODE: tl.constexpr,
):
    """Steps 3-7 on float32 values: the new p, m and w (shared by the float and 8-bit paths),
    and for telemetry whether each element is SGD-like and whether its w saturated (unused,
    and so compiled away, without TELEMETRY)."""
    if MAXIMIZE:
        g = -g
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if DECAY_MODE == L2_DECAY:
        g = g + weight_decay * p
    if DECAY_MODE == DECOUPLED_DECAY:
        p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    # Finite inputs never give NaN (as in csrc/adaml_update.h): g*g is capped so that a zero
    # coefficient cannot meet inf, a coefficient beyond float32 is applied as (g * root)^2, and
    # w saturates at float32's largest value (a NaN that came in stays NaN).
    g2 = g * g
    g2 = tl.where(g2 > FLOAT32_MAX, FLOAT32_MAX, g2)
    term = tl.where(split_g2, (g * root_g2) * (g * root_g2), coef_g2 * g2)
    sgd_like = coef_eps >= term
    w = beta2 * w + term + coef_eps
    saturated = w > FLOAT32_MAX
    w = tl.where(saturated, FLOAT32_MAX, w)
    # IEEE division and square root keep the result within an ulp or two of the reference;
    # where w == 0 the quotient is 0 (and no 0/0 is formed).
    nonzero = w != 0.0
    quotient = tl.where(nonzero, tl.div_rn(m, tl.sqrt_rn(tl.where(nonzero, w, 1.0))), 0.0)
    p = p - step_size * quotient
    return p, m, w, sgd_like, saturated


@triton.jit
def _store_figures(telemetry_ptr, take, valid, old, stored, before, after, sgd_like, saturated,
                   w, PARAM: tl.constexpr, MOMENT: tl.constexpr):
    """The chunk's figures (layout.Figure) into its row, over the `valid` elements: `old` and
    `stored` are the parameter as stored before and after, `before` and `after` the float32
    values the update read and computed, `w` the new w (float32, before rounding on store). A
    skipped step (`take` false) writes nothing."""
    change = stored.to(tl.float32) - old.to(tl.float32)
    squared = tl.sum(tl.where(valid, change * change, 0.0))
    sgd = tl.sum(tl.where(valid, tl.where(sgd_like, 1.0, 0.0), 0.0))
    if MOMENT == tl.bfloat16:
        saturated = w > BFLOAT16_MAX  # bf16 moments saturate at bf16's largest value
    saturated_count = tl.sum(tl.where(valid, tl.where(saturated, 1.0, 0.0), 0.0))
    if PARAM == tl.float32:
        lost = tl.sum(tl.where(valid, 0.0, 0.0))
    else:  # the stored values' bits, as the C++ kernels compare them
        kept = stored.to(tl.uint16, bitcast=True) == old.to(tl.uint16, bitcast=True)
        lost = tl.sum(tl.where(valid, tl.where(kept, tl.where(after != before, 1.0, 0.0), 0.0),
                               0.0))
    columns = tl.arange(0, FIGURES)
    values = tl.where(columns == SGD_LIKE_FIGURE, sgd,
                      tl.where(columns == SQUARED_CHANGE_FIGURE, squared,
                               tl.where(columns == LOST_FIGURE, lost, saturated_count)))
    tl.store(telemetry_ptr + columns, values.to(tl.float64),
             mask=columns < tl.where(take, FIGURES, 0))


@triton.jit
def _element_bits(offs, key, index_base, SR: tl.constexpr):
    """Stochastic rounding's random bits of the elements at offs (0 without SR)."""
    bits = tl.zeros_like(offs).to(tl.uint32)
    if SR:
        # adaml_update.h element_bits(): i is the element's index in the whole parameter.
        i = index_base + offs
        bits = _mix32(_mix32(key ^ i.to(tl.uint32)) ^ (i >> 32).to(tl.uint32))
    return bits


@triton.jit
def _exp_avg_sq_bits(bits):
    """adaml_update.h exp_avg_sq_bits(): another 32 random bits from an element's."""
    return _mix32(bits ^ SQ_STREAM)


@triton.jit
def _load_param(p_ptr, x_ptr, offs, mask, MASTER: tl.constexpr):
    """The parameters the update reads, in float32: the master weights under MASTER."""
    if MASTER:
        return tl.load(x_ptr + offs, mask=mask)
    else:
        return tl.load(p_ptr + offs, mask=mask).to(tl.float32)


@triton.jit
def _store_param(p, bits, p_ptr, x_ptr, offs, mask, PARAM: tl.constexpr,
                 MASTER: tl.constexpr, SR: tl.constexpr):
    """Store the updated parameters (and master weights under MASTER), rounded once."""
    if MASTER:
        tl.store(x_ptr + offs, p, mask=mask)
    tl.store(p_ptr + offs, _store_as(p, bits, PARAM, SR), mask=mask)


@triton.jit
def _update_chunk(
    p_ptr, g_ptr, m_ptr, w_ptr, x_ptr, offs, mask, grad_scale,
    beta1, one_minus_beta1, beta2, coef_g2, root_g2, split_g2, coef_eps, step_size,
    weight_decay, decay, key, index_base, valid, telemetry_ptr, take,
    PARAM: tl.constexpr, MOMENT: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, DECAY_MODE: tl.constexpr,
    TELEMETRY: tl.constexpr,
):
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    old = None
    if TELEMETRY:
        old = tl.load(p_ptr + offs, mask=mask)
    p = _load_param(p_ptr, x_ptr, offs, mask, MASTER)
    before = p
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    p, m, w, sgd_like, saturated = _update_values(
        p, g, m, w, grad_scale, beta1, one_minus_beta1, beta2, coef_g2, root_g2, split_g2,
        coef_eps, step_size, weight_decay, decay, MAXIMIZE, HAS_GRAD_SCALE, DECAY_MODE,
    )
    bits = _element_bits(offs, key, index_base, SR)
    _store_param(p, bits, p_ptr, x_ptr, offs, mask, PARAM, MASTER, SR)
    tl.store(m_ptr + offs, _store_moment(m, bits >> 16, MOMENT, SR), mask=mask)
    w_bits = bits
    if SR:
        w_bits = _exp_avg_sq_bits(bits)
    tl.store(w_ptr + offs, _store_moment(w, w_bits, MOMENT, SR), mask=mask)
    if TELEMETRY:
        _store_figures(telemetry_ptr, take, valid, old, _store_as(p, bits, PARAM, SR), before,
                       p, sgd_like, saturated, w, PARAM, MOMENT)


@triton.jit
def _update_chunk_8bit(
    p_ptr, g_ptr, m_ptr, w_ptr, x_ptr, m_scale_ptr, w_scale_ptr, offs, mask, block_mask,
    grad_scale, beta1, one_minus_beta1, beta2, coef_g2, root_g2, split_g2, coef_eps, step_size,
    weight_decay, decay, key, index_base, valid, telemetry_ptr, take,
    PARAM: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, DECAY_MODE: tl.constexpr,
    TELEMETRY: tl.constexpr,
):
    """_update_chunk for 8-bit moments: offs is the chunk as (blocks, QUANT_BLOCK), the scale
    pointers point at its first block's scales. The moments are decoded with the old scales,
    updated in float32 (p from the unquantized new moments) and encoded, each block's scale
    from its new values; under SR the codes round stochastically (adaml_quant8.h
    exp_avg_code_bits, exp_avg_sq_code_bits) and a bf16 param as in _update_chunk."""
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    old = None
    if TELEMETRY:
        old = tl.load(p_ptr + offs, mask=mask)
    p = _load_param(p_ptr, x_ptr, offs, mask, MASTER)
    before = p
    m = load_blocks(m_ptr, m_scale_ptr, offs, mask, block_mask, EXP_AVG_MAP)
    w = load_blocks(w_ptr, w_scale_ptr, offs, mask, block_mask, EXP_AVG_SQ_MAP)
    p, m, w, sgd_like, saturated = _update_values(
        p, g, m, w, grad_scale, beta1, one_minus_beta1, beta2, coef_g2, root_g2, split_g2,
        coef_eps, step_size, weight_decay, decay, MAXIMIZE, HAS_GRAD_SCALE, DECAY_MODE,
    )
    bits = _element_bits(offs, key, index_base, SR)
    _store_param(p, bits, p_ptr, x_ptr, offs, mask, PARAM, MASTER, SR)
    m_random = None
    w_random = None
    if SR:
        sq = _exp_avg_sq_bits(bits)
        m_random = (sq >> 12).to(tl.int32)
        w_random = (_exp_avg_sq_bits(sq) >> 12).to(tl.int32)
    store_blocks(m, m_ptr, m_scale_ptr, offs, mask, block_mask, m_random, EXP_AVG_MAP)
    store_blocks(w, w_ptr, w_scale_ptr, offs, mask, block_mask, w_random, EXP_AVG_SQ_MAP)
    if TELEMETRY:
        _store_figures(telemetry_ptr, take, valid, old, _store_as(p, bits, PARAM, SR), before,
                       p, sgd_like, saturated, w, PARAM, tl.uint8)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def adaml_kernel(
    rows_ptr, chunk_tensor_ptr, loss_ptr, take_ptr, lr_ptr, grad_scale_ptr, initial_loss_ptr,
    telemetry_ptr,
    lr, beta1, one_minus_beta1, log_beta1, beta2, one_minus_beta2, log_beta2,
    eps, gamma, phi_hi, phi_lo, loss_offset_hi, loss_offset_lo, weight_decay, seed_lo, seed_hi,
    PARAM: tl.constexpr, GRAD: tl.constexpr, MOMENT: tl.constexpr, MASTER: tl.constexpr,
    SR: tl.constexpr, NORMALIZE: tl.constexpr, MAXIMIZE: tl.constexpr,
    DECAY_MODE: tl.constexpr, LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, COLUMNS: tl.constexpr, L_MIN: tl.constexpr,
    TELEMETRY: tl.constexpr,
):
    # Scalar arguments arrive as float32 (Triton's float argument type); widen once. phi and
    # loss_offset come as float32 (hi, lo) pairs: their rounding error would be amplified
    # (phi multiplies log(l); loss_offset is subtracted from a nearby loss).
    lr = tl.cast(lr, tl.float64)
    log_beta1 = tl.cast(log_beta1, tl.float64)
    log_beta2 = tl.cast(log_beta2, tl.float64)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float64)
    eps = tl.cast(eps, tl.float64)
    gamma = tl.cast(gamma, tl.float64)
    phi = tl.cast(phi_hi, tl.float64) + tl.cast(phi_lo, tl.float64)
    loss_offset = tl.cast(loss_offset_hi, tl.float64) + tl.cast(loss_offset_lo, tl.float64)
    weight_decay64 = tl.cast(weight_decay, tl.float64)

    chunk = tl.program_id(0)
    row = rows_ptr + tl.load(chunk_tensor_ptr + chunk).to(tl.int64) * COLUMNS
    p_addr = tl.load(row + PARAM_COLUMN)
    g_addr = tl.load(row + GRAD_COLUMN)
    m_addr = tl.load(row + EXP_AVG_COLUMN)
    w_addr = tl.load(row + EXP_AVG_SQ_COLUMN)
    step_ptr = tl.load(row + STEP_COLUMN).to(tl.pointer_type(tl.float32))
    x_addr = tl.load(row + MASTER_COLUMN)  # master weight (MASTER only)
    numel = tl.load(row + NUMEL_COLUMN)
    start = (chunk - tl.load(row + FIRST_CHUNK_COLUMN)) * CHUNK  # int64: the row is int64
    p_ptr = p_addr.to(tl.pointer_type(PARAM))
    g_ptr = g_addr.to(tl.pointer_type(GRAD))
    m_ptr = m_addr.to(tl.pointer_type(MOMENT))
    w_ptr = w_addr.to(tl.pointer_type(MOMENT))
    x_ptr = x_addr.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        # Lets the compiler use 16-byte vector loads and stores.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        x_ptr = tl.multiple_of(x_ptr, 16)

    # A skipped step is a step over zero elements: nothing is read or written.
    take = tl.load(take_ptr) != 0.0
    numel = tl.where(take, numel, 0)

    # Step-dependent scalars, once per program, in float64.
    loss = tl.load(loss_ptr).to(tl.float64)
    if NORMALIZE:
        # f_1 (float64) is recorded before the launch, once for the whole optimizer.
        f1 = tl.load(initial_loss_ptr)
        scale = tl.maximum(f1 - loss_offset, L_MIN)
        l = tl.maximum((loss - loss_offset) / scale, L_MIN)
    else:
        l = tl.maximum(loss - loss_offset, L_MIN)
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    k_stored = tl.load(step_ptr)
    k = tl.maximum(k_stored.to(tl.float64), 1.0)  # 0 only on a skipped first step
    bias1 = 1.0 - tl.exp(k * log_beta1)  # 1 - beta1^k; log_beta1 = -inf when beta1 = 0
    bias2 = 1.0 - tl.exp(k * log_beta2)
    coef = one_minus_beta2 / (gamma * tl.exp(phi * tl.log(l)))  # may be inf
    split_g2 = coef > FLOAT32_MAX
    coef_g2 = tl.minimum(coef, FLOAT32_MAX).to(tl.float32)
    root_g2 = tl.minimum(tl.sqrt(coef), FLOAT32_MAX).to(tl.float32)
    coef_eps = tl.minimum(eps * l, FLOAT32_MAX).to(tl.float32)
    # m_hat / sqrt(w_hat) = m / sqrt(w) * sqrt(bias2) / bias1
    step_size = (lr * tl.sqrt(bias2) / bias1).to(tl.float32)
    decay = (1.0 - lr * weight_decay64).to(tl.float32)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    # Stochastic rounding's per-tensor key (adaml_update.h tensor_key()).
    key = tl.zeros((), tl.uint32)
    index_base = tl.load(row + ELEMENT_OFFSET_COLUMN)  # the whole parameter's index of element 0 of this tensor
    if SR:
        key = _mix32(seed_lo.to(tl.uint32, bitcast=True) ^ SEED_SALT)
        key = _mix32(key ^ seed_hi.to(tl.uint32, bitcast=True))
        key = _mix32(key ^ k_stored.to(tl.uint32))
        key = _mix32(key ^ tl.load(row + PARAM_INDEX_COLUMN).to(tl.uint32))

    offs = start + tl.arange(0, CHUNK)
    telemetry_ptr += chunk * FIGURES  # this chunk's row (TELEMETRY only)
    if MOMENT == tl.uint8:
        # 8-bit moments: a chunk starts on a block boundary (CHUNK is a multiple of
        # QUANT_BLOCK), so it is CHUNK // QUANT_BLOCK whole blocks, one per row.
        blocks = tl.arange(0, CHUNK // QUANT_BLOCK)
        offs = start + blocks[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :]
        first_block = start // QUANT_BLOCK
        m_scale_ptr = tl.load(row + EXP_AVG_SCALE_COLUMN).to(tl.pointer_type(tl.float32))
        w_scale_ptr = tl.load(row + EXP_AVG_SQ_SCALE_COLUMN).to(tl.pointer_type(tl.float32))
        m_scale_ptr += first_block
        w_scale_ptr += first_block
        valid = None
        if TELEMETRY:
            valid = offs < numel
        if start + CHUNK <= numel:
            _update_chunk_8bit(
                p_ptr, g_ptr, m_ptr, w_ptr, x_ptr, m_scale_ptr, w_scale_ptr, offs, None, None,
                grad_scale, beta1, one_minus_beta1, beta2, coef_g2, root_g2, split_g2, coef_eps,
                step_size, weight_decay, decay, key, index_base, valid, telemetry_ptr, take,
                PARAM, MASTER, SR, MAXIMIZE, HAS_GRAD_SCALE, DECAY_MODE, TELEMETRY,
            )
        else:
            # The tail: masked elements count as 0 in a block's max and are not stored; a
            # block without a valid element keeps its scale (a skipped step: every block).
            _update_chunk_8bit(
                p_ptr, g_ptr, m_ptr, w_ptr, x_ptr, m_scale_ptr, w_scale_ptr, offs, offs < numel,
                start + blocks * QUANT_BLOCK < numel,
                grad_scale, beta1, one_minus_beta1, beta2, coef_g2, root_g2, split_g2, coef_eps,
                step_size, weight_decay, decay, key, index_base, valid, telemetry_ptr, take,
                PARAM, MASTER, SR, MAXIMIZE, HAS_GRAD_SCALE, DECAY_MODE, TELEMETRY,
            )
    elif start + CHUNK <= numel:
        # Full chunk: no mask, so aligned data is moved with 16-byte vector accesses.
        _update_chunk(
            p_ptr, g_ptr, m_ptr, w_ptr, x_ptr, offs, None, grad_scale,
            beta1, one_minus_beta1, beta2, coef_g2, root_g2, split_g2, coef_eps, step_size,
            weight_decay, decay, key, index_base, offs < numel, telemetry_ptr, take, PARAM,
            MOMENT, MASTER, SR, MAXIMIZE, HAS_GRAD_SCALE, DECAY_MODE, TELEMETRY,
        )
    else:
        _update_chunk(
            p_ptr, g_ptr, m_ptr, w_ptr, x_ptr, offs, offs < numel, grad_scale,
            beta1, one_minus_beta1, beta2, coef_g2, root_g2, split_g2, coef_eps, step_size,
            weight_decay, decay, key, index_base, offs < numel, telemetry_ptr, take, PARAM,
            MOMENT, MASTER, SR, MAXIMIZE, HAS_GRAD_SCALE, DECAY_MODE, TELEMETRY,
        )


def _as_float32(x: float) -> float:
    """x rounded to float32, as a compiled kernel receives it; the interpreter then agrees."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _as_float32_pair(x: float) -> tuple[float, float]:
    """x as hi + lo, both float32: about 48 significant bits."""
    hi = _as_float32(x)
    return hi, _as_float32(x - hi)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


@torch.library.custom_op(
    "adaml_kernels::triton_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "master_params", "moment_scales",
                  "telemetry"),
)
def triton_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    master_params: list[torch.Tensor],
    moment_scales: list[torch.Tensor],
    rows: torch.Tensor,
    rows_host: torch.Tensor,
    chunk_tensor: torch.Tensor,
    hyper: list[float],
    config: list[int],
    loss: torch.Tensor,
    take: torch.Tensor,
    lr_tensor: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
    initial_loss: Optional[torch.Tensor],
    telemetry: Optional[torch.Tensor] = None,
) -> None:
    """One AdamL step over the tensors of a bucket, in one launch (schema: Bucket.fused_op_args)."""
    h, cfg = Hyper(*hyper), Config(*config)
    if not params:
        return
    _check_types(params, grads, exp_avgs, exp_avg_sqs, master_params, moment_scales)
    if tuple(cfg[:4]) != (DTYPE_CODES[params[0].dtype], DTYPE_CODES[grads[0].dtype],
                          DTYPE_CODES[exp_avgs[0].dtype], int(bool(master_params))):
        raise ValueError(f"triton_step_: config {cfg} names other dtypes than the tensors'")
    masters = master_params or None
    if table_matches(rows_host, params, grads, exp_avgs, exp_avg_sqs, steps, masters,
                     moment_scales):
        num_chunks, aligned = chunk_tensor.numel(), rows_aligned(rows_host)
    else:  # copies of the tensors (torch.compile): point a fresh table at them
        table = build_table(params, grads, exp_avgs, exp_avg_sqs, steps, masters,
                            rows_host[:, Column.PARAM_INDEX].tolist(),
                            rows_host[:, Column.ELEMENT_OFFSET].tolist(), moment_scales)
        rows, chunk_tensor, num_chunks, aligned = (
            table.rows, table.chunk_tensor, table.num_chunks, table.aligned
        )
    if num_chunks == 0:
        return
    if telemetry is not None and (
            telemetry.dtype != torch.float64 or tuple(telemetry.shape) != (num_chunks, _FIGURES)
            or not telemetry.is_contiguous() or telemetry.device != params[0].device):
        raise ValueError(f"triton_step_: telemetry must be a contiguous float64 tensor of shape "
                         f"({num_chunks}, {_FIGURES}) on {params[0].device}")
    if h.normalize_loss and initial_loss is None:
        raise ValueError("normalize_loss=True needs initial_loss (f_1)")
    if h.weight_decay == 0:
        decay_mode = NO_DECAY.value
    else:
        decay_mode = (DECOUPLED_DECAY if h.decoupled_weight_decay else L2_DECAY).value
    moment = exp_avgs[0].dtype
    sr = rounds_stochastically(bool(cfg.stochastic_rounding), params[0].dtype, moment)
    seed_bits = cfg.seed & ((1 << 64) - 1)
    device = params[0].device
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        adaml_kernel[(num_chunks,)](
            rows, chunk_tensor, loss, take,
            take if lr_tensor is None else lr_tensor,  # unused unless LR_IS_TENSOR
            take if grad_scale is None else grad_scale,  # unused unless HAS_GRAD_SCALE
            take if initial_loss is None else initial_loss,  # unused unless NORMALIZE
            take if telemetry is None else telemetry,  # unused unless TELEMETRY
            *map(_as_float32, (
                h.lr, h.beta1, 1.0 - h.beta1, _log(h.beta1), h.beta2, 1.0 - h.beta2,
                _log(h.beta2), h.eps, h.gamma,
            )),
            *_as_float32_pair(h.phi),
            *_as_float32_pair(h.loss_offset),
            _as_float32(h.weight_decay),
            _as_int32(seed_bits & 0xFFFFFFFF), _as_int32(seed_bits >> 32),
            PARAM=_TRITON_DTYPE[params[0].dtype],
            GRAD=_TRITON_DTYPE[grads[0].dtype],
            MOMENT=_MOMENT_DTYPE[moment],
            MASTER=masters is not None,
            SR=sr,
            NORMALIZE=bool(h.normalize_loss),
            MAXIMIZE=bool(h.maximize),
            DECAY_MODE=decay_mode,
            LR_IS_TENSOR=lr_tensor is not None,
            HAS_GRAD_SCALE=grad_scale is not None,
            ALIGNED=aligned,
            CHUNK=CHUNK,
            COLUMNS=TABLE_COLUMNS,
            L_MIN=L_MIN,
            TELEMETRY=telemetry is not None,
            num_warps=8,
        )


def _as_int32(u: int) -> int:
    """A uint32 value as the int32 with the same bits (one Triton argument type for any seed)."""
    return u - (1 << 32) if u >= (1 << 31) else u


def _check_types(params, grads, exp_avgs, exp_avg_sqs, master_params, moment_scales) -> None:
    """The bucket's dtypes: one each for params, grads and moments, and what the kernel takes;
    8-bit moments' block scales."""
    dtype, grad, moment = params[0].dtype, grads[0].dtype, exp_avgs[0].dtype
    half = dtype in (torch.float16, torch.bfloat16)
    if dtype not in _TRITON_DTYPE:
        raise ValueError(f"triton_step_: {dtype} params are not supported")
    if not (grad == dtype or (half and grad == torch.float32)):
        raise ValueError(f"triton_step_: {grad} gradients for {dtype} params (gradients must "
                         "have the params' dtype, or float32 for float16/bfloat16 params)")
    if moment not in _MOMENT_DTYPE:
        raise ValueError(f"triton_step_: moments must be float32, bfloat16 or uint8 (8-bit), "
                         f"got {moment}")
    _check_scales(params, moment_scales, moment == torch.uint8)
    if master_params and not half:
        raise ValueError(
            f"triton_step_: master_params are for float16/bfloat16 params, not {dtype}")
    if master_params and len(master_params) != len(params):
        raise ValueError(f"triton_step_: master_params has {len(master_params)} tensors, "
                         f"params has {len(params)}")
    for name, tensors, want in (("grads", grads, grad), ("exp_avgs", exp_avgs, moment),
                                ("exp_avg_sqs", exp_avg_sqs, moment), ("params", params, dtype),
                                ("master_params", master_params, torch.float32)):
        for i, t in enumerate(tensors):
            if t.dtype != want:
                raise ValueError(f"triton_step_: {name}[{i}] is {t.dtype}, expected {want}")


def _check_scales(params, moment_scales, eight_bit: bool) -> None:
    """8-bit moments need each tensor's exp_avg scales, then each one's exp_avg_sq scales:
    float32, contiguous, one per QUANT_BLOCK elements (the kernel writes through them)."""
    if not eight_bit:
        if moment_scales:
            raise ValueError("triton_step_: moment_scales are for 8-bit (uint8) moments only")
        return
    n = len(params)
    if len(moment_scales) != 2 * n:
        raise ValueError(f"triton_step_: 8-bit moments need 2 scale tensors per param "
                         f"({2 * n}), got {len(moment_scales)}")
    for i, scale in enumerate(moment_scales):
        blocks = num_blocks(params[i % n].numel())
        if scale.dtype != torch.float32 or not scale.is_contiguous() or \
                scale.numel() != blocks or scale.device != params[i % n].device:
            raise ValueError(
                f"triton_step_: moment_scales[{i}] must be a contiguous float32 tensor of "
                f"{blocks} elements on {params[i % n].device}, got {scale.dtype} "
                f"{tuple(scale.shape)} on {scale.device}")


@triton_step_.register_fake
def _(*args) -> None:
    return None


def step(bucket: Bucket, hp: Hyperparams, inputs: StepInputs) -> None:
    triton_step_(*bucket.fused_op_args(hp, inputs))
