"""AdamL's hyperparameters: their validation (SPEC.md's table) and the form the kernels take."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import Hyper
from .loss import is_real_number

# A param group's keys that are AdamL's hyperparameters, with SPEC.md's defaults.
DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    gamma=1.0,
    phi=1.0,
    loss_offset=0.0,
    normalize_loss=False,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    maximize=False,
)


@dataclass(frozen=True)
class Hyperparams:
    lr: float | torch.Tensor = 1e-3
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

    @classmethod
    def from_group(cls, group: dict) -> "Hyperparams":
        beta1, beta2 = group["betas"]
        return cls(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            gamma=group["gamma"],
            phi=group["phi"],
            loss_offset=group["loss_offset"],
            normalize_loss=group["normalize_loss"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            maximize=group["maximize"],
        )

    def launch_values(self) -> Hyper:
        """The kernels' `float[] hyper` (lr 0.0 when it is a tensor: the kernels read that)."""
        return launch_values(self.lr, self.beta1, self.beta2, self.eps, self.gamma, self.phi,
                             self.loss_offset, self.weight_decay, self.normalize_loss,
                             self.decoupled_weight_decay, self.maximize)


def group_launch_values(group: dict) -> Hyper:
    """Hyperparams.from_group(group).launch_values(), without the dataclass (the fast path)."""
    beta1, beta2 = group["betas"]
    return launch_values(group["lr"], beta1, beta2, group["eps"], group["gamma"], group["phi"],
                         group["loss_offset"], group["weight_decay"], group["normalize_loss"],
                         group["decoupled_weight_decay"], group["maximize"])


def launch_values(lr, beta1, beta2, eps, gamma, phi, loss_offset, weight_decay, normalize_loss,
                  decoupled_weight_decay, maximize) -> Hyper:
    return Hyper(0.0 if isinstance(lr, torch.Tensor) else float(lr), float(beta1), float(beta2),
                 float(eps), float(gamma), float(phi), float(loss_offset), float(weight_decay),
                 float(normalize_loss), float(decoupled_weight_decay), float(maximize))


def validate_group(group: dict) -> None:
    validate(
        group["lr"], group["betas"], group["eps"], group["gamma"], group["phi"],
        group["loss_offset"], group["normalize_loss"], group["weight_decay"],
        group["decoupled_weight_decay"], group["maximize"],
    )


def validate(
    lr, betas, eps, gamma, phi, loss_offset, normalize_loss, weight_decay,
    decoupled_weight_decay, maximize,
) -> None:
    """Raise ValueError for any value SPEC.md does not allow. Where torch.optim.Adam rejects the
    same value, the message starts with Adam's words, so code that matches on them still works.
    """
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise ValueError(f"Invalid learning rate: {lr!r} (a tensor lr must be floating)")
        # Its value is not read: that would synchronise the device.
    elif not is_real_number(lr) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"Invalid learning rate: {lr!r} (lr must be a finite number > 0)")
    if not is_real_number(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"Invalid epsilon value: {eps!r} (eps must be a finite number >= 0)")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    for index, b in enumerate((beta1, beta2)):
        if not is_real_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {index}: {b!r} (betas[{index}] must be in "
                "[0, 1))"
            )
    if not is_real_number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay!r} (must be a finite number >= 0)"
        )
    checks = (
        ("gamma", gamma, lambda v: v > 0, " > 0"),
        ("phi", phi, lambda v: v >= 0, " >= 0"),
        ("loss_offset", loss_offset, lambda v: True, ""),
    )
    for name, value, ok, rule in checks:
        if not is_real_number(value) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"Invalid {name}: {value!r} (must be a finite number{rule})")
    for name, value in (
        ("normalize_loss", normalize_loss),
        ("decoupled_weight_decay", decoupled_weight_decay),
        ("maximize", maximize),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (must be a bool)")
