"""Reference backend: SPEC.md written as plain PyTorch, one parameter at a time.

It runs on any device and dtype and is the oracle the fused backends are tested against. The
per-step scalars (the scaled loss l, the bias corrections) are computed in float64; the
element-wise update in the compute dtype (float32, or float64 for float64 parameters), and the
new parameter is rounded once on store. A skipped step is masked with torch.where, so the loss
is never read on the host.
"""

from __future__ import annotations

import torch

from .buckets import Bucket, moment_dtype
from .hyperparams import Hyperparams
from .loss import L_MIN, StepInputs, move


def step(bucket: Bucket, hp: Hyperparams, inputs: StepInputs) -> None:
    taken = inputs.take.bool()
    scalar_dtype = torch.float32 if inputs.loss.device.type == "mps" else torch.float64
    loss = inputs.loss.to(scalar_dtype)
    f1 = inputs.initial_loss.to(scalar_dtype) if hp.normalize_loss else None
    lr = hp.lr
    if isinstance(lr, torch.Tensor):  # any one-element shape acts as a scalar, never broadcasts
        lr = move(lr.reshape(()), bucket.device)
    for i, p in enumerate(bucket.params):
        _update(
            p, bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i], bucket.steps[i], f1,
            hp, lr, loss, taken, inputs.grad_scale,
        )


def _update(p, g, m, w, step, f1, hp: Hyperparams, lr, loss, taken, grad_scale) -> None:
    compute = moment_dtype(p.dtype)
    big = torch.finfo(compute).max

    # 1. scaled loss (f_1 is recorded once per optimizer, before the buckets run)
    scale = torch.clamp(f1 - hp.loss_offset, min=L_MIN) if hp.normalize_loss else 1.0
    l = torch.clamp((loss - hp.loss_offset) / scale, min=L_MIN)

    # 2. k: the step count, already advanced by the caller
    k = step.to(loss.dtype)

    # 3. gradient transforms and weight decay
    g = g.to(compute)
    param = p.to(compute)
    if hp.maximize:
        g = -g
    if grad_scale is not None:
        g = g / grad_scale.to(compute)
    if hp.weight_decay > 0:
        if hp.decoupled_weight_decay:
            param = param * (1 - lr * hp.weight_decay)
        else:
            g = g + hp.weight_decay * param

    # 4-5. moments
    b1, b2 = hp.beta1, hp.beta2
    m_new = b1 * m + (1 - b1) * g
    # Finite inputs never give NaN: w saturates at the largest finite value (SPEC.md,
    # Precision), and a coefficient beyond the compute dtype is applied as (g * sqrt(coef))^2.
    coef = (1 - b2) / (hp.gamma * l**hp.phi)  # float64, may be inf
    split = coef > big
    root = torch.clamp(coef.sqrt(), max=big).to(compute)
    capped = torch.clamp(coef, max=big).to(compute) * (g * g).clamp(max=big)
    term = torch.where(split, (g * root) * (g * root), capped)
    w_new = (b2 * w + term + torch.clamp(hp.eps * l, max=big).to(compute)).clamp(max=big)

    # 6-7. bias correction and parameter update
    m_hat = m_new / (1 - b1**k)
    w_hat = w_new / (1 - b2**k)
    quotient = torch.where(w_hat == 0, 0.0, m_hat / w_hat.sqrt())
    param = param - lr * quotient

    p.copy_(torch.where(taken, param.to(p.dtype), p))
    m.copy_(torch.where(taken, m_new, m))
    w.copy_(torch.where(taken, w_new, w))
