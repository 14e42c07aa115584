"""Reference backend: SPEC.md written as plain PyTorch, one parameter at a time.

It runs on any device and dtype and is the oracle the fused backends are tested against. The
per-step scalars (the scaled loss l, the bias corrections) are computed in float64; the
element-wise update in the compute dtype (float32, or float64 for float64 parameters), and the
new parameter is rounded once on store. A skipped step is masked with torch.where, so the loss
is never read on the host. Low precision (precision.py): the update reads the float32 master
weight instead of the parameter where there is one, and values stored as bf16 are rounded
stochastically when the bucket asks for it, with the fused kernels' random bits. With a
telemetry buffer (telemetry.py), row i gets tensor i's figures (layout.Figure).
"""

from __future__ import annotations

import torch

from . import precision, quant8
from .buckets import Bucket
from .hyperparams import Hyperparams
from .layout import L_MIN, Figure
from .loss import StepInputs, move


def step(bucket: Bucket, hp: Hyperparams, inputs: StepInputs) -> None:
    taken = inputs.take.bool()
    scalar_dtype = torch.float32 if inputs.loss.device.type == "mps" else torch.float64
    loss = inputs.loss.to(scalar_dtype)
    f1 = inputs.initial_loss.to(scalar_dtype) if hp.normalize_loss else None
    lr = hp.lr
    if isinstance(lr, torch.Tensor):  # any one-element shape acts as a scalar, never broadcasts
        lr = move(lr.reshape(()), bucket.device)
    masters = bucket.master_params or [None] * len(bucket.params)
    n = len(bucket.params)
    scales = bucket.moment_scales or [None] * (2 * n)
    telemetry = bucket.telemetry
    for i, p in enumerate(bucket.params):
        bits = None
        if precision.rounds_stochastically(bucket.stochastic_rounding, p.dtype,
                                           bucket.exp_avgs[i].dtype):
            key = precision.tensor_key(bucket.seed, bucket.steps[i], bucket.param_indices[i])
            index = precision.element_index(p, bucket.element_offsets[i])
            bits = precision.element_bits(key, index)
        _update(
            p, bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i], bucket.steps[i], f1,
            hp, lr, loss, taken, inputs.grad_scale, masters[i], bits, scales[i], scales[n + i],
            None if telemetry is None else telemetry[i],
        )


def _update(p, g, m, w, step, f1, hp: Hyperparams, lr, loss, taken, grad_scale, master,
            bits, m_scale=None, w_scale=None, figures=None) -> None:
    compute = torch.float64 if p.dtype == torch.float64 else torch.float32
    big = torch.finfo(compute).max

    # 1. scaled loss (f_1 is recorded once per optimizer, before the buckets run)
    scale = torch.clamp(f1 - hp.loss_offset, min=L_MIN) if hp.normalize_loss else 1.0
    l = torch.clamp((loss - hp.loss_offset) / scale, min=L_MIN)

    # 2. k: the step count, already advanced by the caller
    k = step.to(loss.dtype)

    # 3. gradient transforms and weight decay
    g = g.to(compute)
    param = p.to(compute) if master is None else master
    before = param
    if hp.maximize:
        g = -g
    if grad_scale is not None:
        g = g / grad_scale.to(compute)
    if hp.weight_decay > 0:
        if hp.decoupled_weight_decay:
            param = param * (1 - lr * hp.weight_decay)
        else:
            g = g + hp.weight_decay * param

    # 4-5. moments (8-bit moments: decoded first)
    b1, b2 = hp.beta1, hp.beta2
    m_old = m.to(compute) if m_scale is None else quant8.decode(m, m_scale, quant8.EXP_AVG_MAP)
    w_old = w.to(compute) if w_scale is None else quant8.decode(
        w, w_scale, quant8.EXP_AVG_SQ_MAP)
    m_new = b1 * m_old + (1 - b1) * g
    # Finite inputs never give NaN: w saturates at the largest finite value (SPEC.md,
    # Precision), and a coefficient beyond the compute dtype is applied as (g * sqrt(coef))^2.
    coef = (1 - b2) / (hp.gamma * l**hp.phi)  # float64, may be inf
    split = coef > big
    root = torch.clamp(coef.sqrt(), max=big).to(compute)
    capped = torch.clamp(coef, max=big).to(compute) * (g * g).clamp(max=big)
    term = torch.where(split, (g * root) * (g * root), capped)
    eps_l = torch.clamp(hp.eps * l, max=big).to(compute)
    w_exact = b2 * w_old + term + eps_l
    w_new = w_exact.clamp(max=big)

    # 6-7. bias correction and parameter update
    m_hat = m_new / (1 - b1**k)
    w_hat = w_new / (1 - b2**k)
    quotient = torch.where(w_hat == 0, 0.0, m_hat / w_hat.sqrt())
    param = param - lr * quotient

    # Each array rounded once on store (stochastically with `bits` where it is bf16).
    w_bits = None if bits is None else precision.exp_avg_sq_bits(bits)
    m_bits = None if bits is None else bits >> 16
    stored = precision.store(param, p.dtype, bits)
    if figures is not None:
        _measure(figures, p, stored, before, param, term, eps_l, w_exact, w.dtype)
    p.copy_(torch.where(taken, stored, p))
    if master is not None:
        master.copy_(torch.where(taken, param, master))
    if m_scale is not None:  # 8-bit moments: encoded, each block's scale from its new values
        randoms = (None, None) if bits is None else precision.code_bits(bits)
        for codes, scale, new, which, random in (
                (m, m_scale, m_new, quant8.EXP_AVG_MAP, randoms[0]),
                (w, w_scale, w_new, quant8.EXP_AVG_SQ_MAP, randoms[1])):
            if random is not None:
                random = quant8.laid_out_like(random, codes, torch.int64)
            new_codes, new_scale = quant8.encode(quant8.laid_out_like(new, codes), which, random)
            codes.copy_(torch.where(taken, new_codes, codes))
            scale.copy_(torch.where(taken, new_scale, scale))
        return
    m.copy_(torch.where(taken, precision.store_moment(m_new, m.dtype, m_bits), m))
    w.copy_(torch.where(taken, precision.store_moment(w_new, w.dtype, w_bits), w))


def _measure(figures, p, stored, before, after, term, eps_l, w_exact, moment_dtype) -> None:
    """A tensor's telemetry (SPEC.md, Telemetry) into `figures` (its row, layout.Figure): p is
    the parameter as stored before the step, `stored` after it; before/after the values the
    update read and computed (in the compute dtype)."""
    compute = before.dtype
    change = stored.to(compute) - p.to(compute)
    top = precision.BFLOAT16_MAX if moment_dtype == torch.bfloat16 else torch.finfo(compute).max
    row = torch.zeros(len(Figure), dtype=figures.dtype, device=p.device)
    row[Figure.SGD_LIKE] = (eps_l >= term).sum()
    row[Figure.SQUARED_CHANGE] = (change * change).sum(dtype=figures.dtype)
    if p.dtype in precision.HALF:  # (the stored values' bits: as the kernels compare them)
        kept = stored.view(torch.int16) == p.view(torch.int16)
        row[Figure.LOST] = ((after != before) & kept).sum()
    row[Figure.SATURATED] = (w_exact > top).sum()
    figures.copy_(row)
