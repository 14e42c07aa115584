"""Functional AdamL: one step on given tensors, in place. The optimizer class calls run_buckets.

    adaml_step_(params, grads, exp_avgs, exp_avg_sqs, steps, loss, lr=1e-3, ...)

The update is exactly docs/SPEC.md (summarised in the README). The loss is never read
on the host: whether the step is taken is decided on the device, so the call is free of device
synchronisation and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from . import backends
from .buckets import Bucket, is_dense, moment_dtype

L_MIN = 1e-12  # floor of the scaled loss l, and of the normalisation scale


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


def _is_real_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_hyperparameters(
    lr, betas, eps, gamma, phi, loss_offset, normalize_loss, weight_decay,
    decoupled_weight_decay, maximize,
) -> None:
    """Raise ValueError, naming the argument, for any value SPEC.md does not allow."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"lr must be a float or a one-element floating tensor, got {lr!r}")
    elif not _is_real_number(lr):
        raise ValueError(f"lr must be a float or a 0-dim tensor, got {lr!r}")
    # A tensor lr is checked only for its shape: reading its value would synchronise the device.
    if not isinstance(lr, torch.Tensor) and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"Invalid lr: {lr} (must be > 0)")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    for name, b in (("betas[0]", beta1), ("betas[1]", beta2)):
        if not _is_real_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid {name} in betas: {b!r} (must be in [0, 1))")
    checks = (
        ("eps", eps, lambda v: v >= 0, ">= 0"),
        ("gamma", gamma, lambda v: v > 0, "> 0"),
        ("phi", phi, lambda v: v >= 0, ">= 0"),
        ("loss_offset", loss_offset, lambda v: True, "finite"),
        ("weight_decay", weight_decay, lambda v: v >= 0, ">= 0"),
    )
    for name, value, ok, rule in checks:
        if not _is_real_number(value) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"Invalid {name}: {value!r} (must be a finite number {rule})")
    for name, value in (
        ("normalize_loss", normalize_loss),
        ("decoupled_weight_decay", decoupled_weight_decay),
        ("maximize", maximize),
    ):
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {name}: {value!r} (must be a bool)")


def _check_loss(loss) -> None:
    if loss is None:
        raise TypeError(
            "AdamL needs the current loss: call step(loss) with the loss whose gradients are in "
            ".grad (a 0-dim tensor or a number), or step(closure) with a closure that "
            "recomputes and returns it"
        )
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"loss must have exactly one element, got shape {tuple(loss.shape)}; "
                "reduce it (e.g. loss.mean()) before the step"
            )
        if loss.is_complex() or loss.dtype == torch.bool:
            raise ValueError(f"loss must be a real number, got dtype {loss.dtype}")
    elif not _is_real_number(loss):
        raise TypeError(f"loss must be a 0-dim tensor or a real number, got {type(loss).__name__}")


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def check_param(p: torch.Tensor, what: str = "parameter") -> None:
    if _is_dtensor(p):
        raise ValueError(
            f"AdamL does not support DTensor {what}s yet (FSDP2, tensor parallel): its kernels "
            "update local storage through a pointer table. FSDP with flat parameters and DDP work"
        )
    if p.is_complex():
        raise ValueError(f"AdamL does not support complex {what}s (got {p.dtype})")
    if not p.is_floating_point():
        raise ValueError(f"AdamL needs floating-point {what}s, got {p.dtype}")
    if p.layout != torch.strided:
        raise ValueError(f"AdamL does not support {p.layout} {what}s")


def check_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError("AdamL does not support sparse gradients; use a dense gradient")
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise ValueError(
            f"gradient does not match its parameter: grad {tuple(g.shape)} {g.dtype} on "
            f"{g.device}, param {tuple(p.shape)} {p.dtype} on {p.device}"
        )


def check_kernel_layout(p: torch.Tensor, others: list[torch.Tensor], backend: str) -> None:
    """Fused kernels walk each tensor as one flat array: all must be dense with equal strides
    (a dimension of size 1 has no stride that matters)."""

    def same_layout(t):
        return all(n == 1 or a == b for n, a, b in zip(p.shape, t.stride(), p.stride()))

    if not is_dense(p) or not all(same_layout(t) for t in others):
        raise ValueError(
            f"backend {backend!r} needs each parameter, its gradient and its moments to be dense "
            f"with the same strides (param strides {p.stride()}, others "
            f"{[t.stride() for t in others]}); use backend='reference' for such tensors"
        )


def decide_take(loss: torch.Tensor, found_inf: torch.Tensor | None) -> torch.Tensor:
    """1.0 if the step is taken, 0.0 if it is skipped (non-finite loss or found_inf), on device."""
    ok = torch.isfinite(loss)
    if found_inf is not None:
        ok = ok & (found_inf.to(loss.device, non_blocking=True) == 0)
    return ok.to(torch.float32)


def run_buckets(
    buckets: list[tuple[Bucket, str]],
    hp: Hyperparams,
    loss: torch.Tensor,
    take: torch.Tensor,
    grad_scale: torch.Tensor | None,
) -> None:
    """Advance the step counts and update every bucket with its backend. Nothing is validated."""
    on_device = {loss.device: (loss, take, grad_scale)}
    if grad_scale is not None and grad_scale.device != loss.device:
        on_device = {}
    for bucket, backend_name in buckets:
        dev = bucket.device
        if dev not in on_device:
            on_device[dev] = tuple(
                None if t is None else t.to(dev, non_blocking=True)
                for t in (loss, take, grad_scale)
            )
        loss_d, take_d, scale_d = on_device[dev]
        bucket.advance_steps(take_d)
        backends.step_function(backend_name)(bucket, hp, loss_d, take_d, scale_d)


def adaml_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    loss: torch.Tensor | float,
    *,
    initial_losses: list[torch.Tensor] | None = None,
    lr: float | torch.Tensor = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    gamma: float = 1.0,
    phi: float = 1.0,
    loss_offset: float = 0.0,
    normalize_loss: bool = False,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One AdamL step, in place, on lists of tensors (as torch.optim.adam.adam does for Adam).

    steps: 0-dim float32 tensors on the parameters' devices, the number of steps taken so far;
        each is advanced by one unless the step is skipped.
    initial_losses: 0-dim tensors of the moment dtype holding f_1 (NaN until the first step
        taken), required when normalize_loss=True.
    grad_scale / found_inf: as handed over by torch.amp.GradScaler.
    Returns a 0-dim bool tensor on the loss's device: whether the step was taken (not synced).
    """
    validate_hyperparameters(
        lr, betas, eps, gamma, phi, loss_offset, normalize_loss, weight_decay,
        decoupled_weight_decay, maximize,
    )
    _check_loss(loss)
    n = len(params)
    lists = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    if normalize_loss:
        if initial_losses is None:
            raise ValueError("normalize_loss=True needs initial_losses (NaN until first step)")
        lists["initial_losses"] = initial_losses
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors, params has {n}")

    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        check_param(p)
        check_grad(p, grads[i])
        mdt = moment_dtype(p.dtype)
        for name in ("exp_avgs", "exp_avg_sqs"):
            t = lists[name][i]
            if t.shape != p.shape or t.dtype != mdt or t.device != p.device:
                raise ValueError(
                    f"{name}[{i}] must be {mdt} of shape {tuple(p.shape)} on {p.device}"
                )
        s = steps[i]
        if s.dim() != 0 or s.dtype != torch.float32 or s.device != p.device:
            raise ValueError(f"steps[{i}] must be a 0-dim float32 tensor on {p.device}")
        if normalize_loss:
            f1 = initial_losses[i]
            if f1.dim() != 0 or f1.dtype != mdt or f1.device != p.device:
                raise ValueError(f"initial_losses[{i}] must be a 0-dim {mdt} tensor on {p.device}")
        groups.setdefault((p.device, p.dtype), []).append(i)

    buckets = []
    for (device, dtype), idx in groups.items():
        name = backends.select(backend, device, dtype)
        if backends.is_fused(name):
            for i in idx:
                check_kernel_layout(params[i], [grads[i], exp_avgs[i], exp_avg_sqs[i]], name)
        bucket = Bucket(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [steps[i] for i in idx],
            [initial_losses[i] for i in idx] if normalize_loss else None,
        )
        buckets.append((bucket, name))

    if isinstance(loss, torch.Tensor):
        loss_t = loss.detach().reshape(())
    else:
        # A Python number is already on the host: put it where the parameters are.
        device = params[0].device if params else torch.device("cpu")
        loss_t = torch.tensor(float(loss), dtype=torch.float64, device=device)
    if not loss_t.is_floating_point():
        loss_t = loss_t.to(torch.float32)
    take = decide_take(loss_t, found_inf)
    hp = Hyperparams(
        lr, betas[0], betas[1], eps, gamma, phi, loss_offset, normalize_loss, weight_decay,
        decoupled_weight_decay, maximize,
    )
    run_buckets(buckets, hp, loss_t, take, grad_scale)
    return take.bool()
