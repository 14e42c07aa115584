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
from .functional import L_MIN, Hyperparams


def step(bucket: Bucket, hp: Hyperparams, loss, take, grad_scale) -> None:
    taken = take.bool()
    scalar_dtype = torch.float32 if loss.device.type == "mps" else torch.float64
    loss = loss.to(scalar_dtype)
    for i, p in enumerate(bucket.params):
        f1 = bucket.initial_losses[i] if hp.normalize_loss else None
        _update(
            p, bucket.grads[i], bucket.exp_avgs[i], bucket.exp_avg_sqs[i], bucket.steps[i], f1,
            hp, loss, taken, grad_scale,
        )


def _update(p, g, m, w, step, f1, hp: Hyperparams, loss, taken, grad_scale) -> None:
    compute = moment_dtype(p.dtype)

    # 1. scaled loss
    if hp.normalize_loss:
        # f_1 is the first loss as kept in state (the moment dtype), also on the first step.
        first_loss = torch.where(torch.isnan(f1), loss.to(f1.dtype), f1)
        f1.copy_(torch.where(taken, first_loss, f1))
        first_loss = first_loss.to(loss.dtype)
        scale = torch.clamp(first_loss - hp.loss_offset, min=L_MIN)
    else:
        scale = 1.0
    l = torch.clamp((loss - hp.loss_offset) / scale, min=L_MIN)

    # 2. k: the step count, already advanced by the caller
    k = step.to(loss.dtype)

    # 3. gradient transforms and weight decay
    lr = hp.lr
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
    w_new = b2 * w + (1 - b2) * g * g / (hp.gamma * l**hp.phi) + hp.eps * l

    # 6-7. bias correction and parameter update
    m_hat = m_new / (1 - b1**k)
    w_hat = w_new / (1 - b2**k)
    quotient = torch.where(w_hat == 0, 0.0, m_hat / w_hat.sqrt())
    param = param - lr * quotient

    p.copy_(torch.where(taken, param.to(p.dtype), p))
    m.copy_(torch.where(taken, m_new, m))
    w.copy_(torch.where(taken, w_new, w))
