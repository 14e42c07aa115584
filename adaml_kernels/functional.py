"""Functional AdamL: one step on given tensors, in place, as torch.optim.adam.adam is for Adam.

    adaml_step_(params, grads, exp_avgs, exp_avg_sqs, steps, loss, lr=1e-3, ...)

The update is exactly docs/SPEC.md; the low-precision modes (docs/low_precision.md) are there
too: bf16 moments (pass bf16 exp_avgs/exp_avg_sqs), float32 master
weights (master_params=) and stochastic rounding (stochastic_rounding=, seed=, param_indices=).
The loss is never read on the host, and the call never waits for the device: whether the step
is taken is decided on the device, and the pointer tables reach it by non-blocking copies. Each
call builds its buckets and tables anew, so the call cannot be captured in a CUDA graph (a
capture cannot copy from the host); the AdamL optimizer keeps its tables between steps and can
be captured.
"""

from __future__ import annotations

import torch

from . import backends, plan as planning
from .buckets import Bucket
from .hyperparams import Hyperparams, validate
from .loss import StepInputs, as_tensor, check_loss, decide_take, record_initial_loss
from .precision import validate_precision
from .tensor_checks import check_grad, check_kernel_layout, check_param

HALF = (torch.float16, torch.bfloat16)


def adaml_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    loss: torch.Tensor | float,
    *,
    initial_loss: torch.Tensor | None = None,
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
    master_params: list[torch.Tensor] | None = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    param_indices: list[int] | None = None,
) -> torch.Tensor:
    """One AdamL step, in place, on lists of tensors.

    steps: 0-dim float32 tensors on the parameters' devices, the number of steps taken so far;
        each is advanced by one unless the step is skipped.
    initial_loss: f_1, a 0-dim float64 tensor (NaN until the first step taken, which records
        its loss there), required when normalize_loss=True.
    grad_scale / found_inf: as handed over by torch.amp.GradScaler.
    exp_avgs / exp_avg_sqs: float32, or bfloat16 (float64 for float64 params), one dtype.
    master_params: float32 master weights of float16/bfloat16 params (None for the others).
    stochastic_rounding, seed, param_indices: stochastic rounding of what is stored as bf16,
        the bits hashed from (seed, step, param_indices[i] (default i), element index).
    Returns a 0-dim bool tensor on the loss's device: whether the step was taken (not synced).
    """
    validate(
        lr, betas, eps, gamma, phi, loss_offset, normalize_loss, weight_decay,
        decoupled_weight_decay, maximize,
    )
    check_loss(loss)
    n = len(params)
    lists = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors, params has {n}")
    if normalize_loss and initial_loss is None:
        raise ValueError("normalize_loss=True needs initial_loss (f_1; NaN until the first step)")
    if initial_loss is not None and (initial_loss.dim() != 0
                                     or initial_loss.dtype != torch.float64):
        raise ValueError("initial_loss must be a 0-dim float64 tensor")
    validate_precision(stochastic_rounding, False, None, seed)
    if master_params is not None and len(master_params) != n:
        raise ValueError(f"master_params has {len(master_params)} entries, params has {n}")
    if param_indices is not None and len(param_indices) != n:
        raise ValueError(f"param_indices has {len(param_indices)} entries, params has {n}")
    masters = master_params or [None] * n
    indices = list(range(n)) if param_indices is None else list(param_indices)

    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        check_param(p)
        check_grad(p, grads[i])
        mdts = (torch.float64,) if p.dtype == torch.float64 else (torch.float32, torch.bfloat16)
        for name in ("exp_avgs", "exp_avg_sqs"):
            t = lists[name][i]
            if t.shape != p.shape or t.dtype not in mdts or t.device != p.device:
                raise ValueError(
                    f"{name}[{i}] must be {' or '.join(map(str, mdts))} of shape "
                    f"{tuple(p.shape)} on {p.device}"
                )
        if exp_avg_sqs[i].dtype != exp_avgs[i].dtype:
            raise ValueError(f"exp_avg_sqs[{i}] must have exp_avgs[{i}]'s dtype")
        x = masters[i]
        if x is not None and (x.shape != p.shape or x.dtype != torch.float32
                              or x.device != p.device or p.dtype not in HALF):
            raise ValueError(f"master_params[{i}] must be None, or float32 of shape "
                             f"{tuple(p.shape)} on {p.device} for a float16/bfloat16 param")
        s = steps[i]
        if s.dim() != 0 or s.dtype != torch.float32 or s.device != p.device:
            raise ValueError(f"steps[{i}] must be a 0-dim float32 tensor on {p.device}")
        key = (p.device, p.dtype, grads[i].dtype, exp_avgs[i].dtype, x is not None)
        groups.setdefault(key, []).append(i)

    buckets = []
    for (device, dtype, _, _, has_master), idx in groups.items():
        name = backends.select(backend, device, dtype)
        if backends.is_fused(name):
            for i in idx:
                others = [grads[i], exp_avgs[i], exp_avg_sqs[i]] + (
                    [masters[i]] if has_master else [])
                check_kernel_layout(params[i], others, name)
        bucket = Bucket(
            *([lst[i] for i in idx] for lst in (params, grads, exp_avgs, exp_avg_sqs, steps)),
            master_params=[masters[i] for i in idx] if has_master else None,
            param_indices=[indices[i] for i in idx],
            stochastic_rounding=stochastic_rounding, seed=seed,
        )
        buckets.append((bucket, name))

    home = initial_loss.device if initial_loss is not None else (
        params[0].device if params else torch.device("cpu"))
    loss_t = as_tensor(loss, home)
    take = decide_take(loss_t, found_inf)
    if initial_loss is not None:
        record_initial_loss(initial_loss, loss_t, take)
    hp = Hyperparams(
        lr, betas[0], betas[1], eps, gamma, phi, loss_offset, normalize_loss, weight_decay,
        decoupled_weight_decay, maximize,
    )
    planning.run(buckets, hp, StepInputs(loss_t, take, grad_scale, initial_loss), {})
    return take.bool()
