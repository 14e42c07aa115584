"""SPEC.md evaluated in float64 with NumPy: the yardstick every backend is measured against.

Written straight from the spec, independently of the package's code. Parameters stored in a
half type are rounded (to nearest, ties to even) on store, as the spec says; everything else
stays in float64, except that w saturates at the largest finite value of the moment dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

L_MIN = 1e-12
FLOAT32_MAX = float(np.finfo(np.float32).max)

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
            p = st.p
            if h.maximize:
                g = -g
            if grad_scale is not None:
                g = g / grad_scale
            if h.weight_decay > 0 and not h.decoupled_weight_decay:
                g = g + h.weight_decay * p
            if h.weight_decay > 0 and h.decoupled_weight_decay:
                p = p * (1 - h.lr * h.weight_decay)
            # 4-5.
            st.m = h.beta1 * st.m + (1 - h.beta1) * g
            st.w = h.beta2 * st.w + (1 - h.beta2) * g**2 / (h.gamma * l**h.phi) + h.eps * l
            if st.storage != "float64":  # float32 moments saturate (SPEC.md, Precision)
                st.w = np.minimum(st.w, FLOAT32_MAX)
            # 6-7.
            m_hat = st.m / (1 - h.beta1**st.k)
            w_hat = st.w / (1 - h.beta2**st.k)
            with np.errstate(divide="ignore", invalid="ignore"):
                quotient = np.where(w_hat == 0, 0.0, m_hat / np.sqrt(w_hat))
            st.p = round_to_storage(p - h.lr * quotient, st.storage)
