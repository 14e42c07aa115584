"""Reference baselines written from their papers: EAdam and AdaBelief.

Both are Adam with a different second moment; everything else (first moment, bias corrections,
eps added to the denominator) is Adam's. They keep torch.optim.Adam's state keys (step, exp_avg,
exp_avg_sq) so they can be compared with AdamL's state directly.

EAdam (Yuan & Gao 2020, "EAdam Optimizer: How eps Impact Adam", Algorithm 1):
    m = b1*m + (1-b1)*g
    v = b2*v + (1-b2)*g^2 ;  v = v + eps        (eps added to v after every update)
    p = p - lr * m_hat / (sqrt(v_hat) + eps),    m_hat = m/(1-b1^k), v_hat = v/(1-b2^k)

AdaBelief (Zhuang et al. 2020, NeurIPS, Algorithm 2, without the optional projection):
    m = b1*m + (1-b1)*g
    s = b2*s + (1-b2)*(g - m)^2 + eps           (g - m uses the new m)
    p = p - lr * m_hat / (sqrt(s_hat) + eps),    s_hat = s/(1-b2^k)
"""

from __future__ import annotations

import math

import torch


class _AdamFamily(torch.optim.Optimizer):
    """Adam's skeleton; subclasses define the second-moment update."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        if not lr > 0:
            raise ValueError(f"Invalid lr: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if not eps >= 0:
            raise ValueError(f"Invalid eps: {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    def _second_moment_(self, v, g, m, beta2, eps) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                k = st["step"]
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                self._second_moment_(v, g, m, b2, eps)
                # denominator sqrt(v / (1 - b2^k)) + eps, step lr / (1 - b1^k)
                denom = (v.sqrt() / math.sqrt(1 - b2**k)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**k))
        return loss


class EAdam(_AdamFamily):
    """Adam with eps added to the second moment at every step (Yuan & Gao 2020)."""

    def _second_moment_(self, v, g, m, beta2, eps) -> None:
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2).add_(eps)


class AdaBelief(_AdamFamily):
    """Adam whose second moment tracks (g - m)^2, the 'belief' in the gradient
    (Zhuang et al. 2020)."""

    def _second_moment_(self, v, g, m, beta2, eps) -> None:
        d = g - m
        v.mul_(beta2).addcmul_(d, d, value=1 - beta2).add_(eps)
