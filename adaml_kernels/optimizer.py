"""AdamL as a torch.optim.Optimizer: a drop-in for torch.optim.Adam that also takes the loss."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import torch

from . import backends
from .buckets import Bucket, is_dense, moment_dtype
from .functional import (
    Hyperparams,
    check_grad,
    check_kernel_layout,
    check_param,
    decide_take,
    run_buckets,
    validate_hyperparameters,
    _check_loss,
)

# Each parameter's moments start on a 64-byte boundary of the flat buffer.
_ALIGN_BYTES = 64
# The exp_avg_sq row does not start a power of two after the exp_avg row: with a large bucket
# the two streams would then map to the same cache sets (4K aliasing), which made the CPU step
# 25-35% slower at 64M parameters.
_ROW_GAP_BYTES = 4096 + 64


@dataclass
class _GroupPlan:
    """What one param group's step launches, valid while `key` (storage addresses) holds."""

    params: list[torch.Tensor]  # the parameters that have a gradient, in group order
    key: list[int]
    buckets: list[tuple[Bucket, str]]  # with the backend that runs each
    members: list[list[int]]  # per bucket, its parameters' indices in `params`


class AdamL(torch.optim.Optimizer):
    """AdamL (Xia & Massei, arXiv 2312.15295): Adam whose second moment uses the loss.

        w = b2*w + (1 - b2)*g^2 / (gamma * l^phi) + eps*l,    l = max(loss - loss_offset, 1e-12)

    Call ``opt.step(loss)`` after ``loss.backward()``, or ``opt.step(closure)``. The loss may be
    a 0-dim tensor (never read on the host) or a number. A step with a non-finite loss, or one
    that torch.amp.GradScaler flags with found_inf, is skipped and changes nothing.

    Args beyond torch.optim.Adam's:
        gamma, phi: the adaptive term is divided by gamma * l^phi.
        loss_offset: f*, the optimal loss or a lower bound of it.
        normalize_loss: divide loss - f* by f_1 - f*, f_1 being the loss of the first step.
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see available_backends()).
        loss_group: under torch.distributed, the losses of this process group are averaged so
            that every rank uses the same l. "world" (default) uses the default group when
            torch.distributed is initialized; None turns the averaging off.

    State: per parameter, torch.optim.Adam's ``step``, ``exp_avg`` and ``exp_avg_sq`` (views of
    flat per-bucket buffers; modify them in place or through load_state_dict) and AdamL's
    ``initial_loss`` (f_1, NaN until the first step taken).
    """

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale and found_inf

    def __init__(
        self,
        params,
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
        backend: str = "auto",
        *,
        loss_group="world",
    ):
        backends.check_name(backend)
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            gamma=gamma,
            phi=phi,
            loss_offset=loss_offset,
            normalize_loss=normalize_loss,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        )
        _validate_group(defaults)
        self.backend = backend
        self.loss_group = loss_group
        # (group, device, dtype) -> ids of the parameters whose state is packed in flat buffers
        self._packed: dict[tuple, set[int]] = {}
        self._plans: list[_GroupPlan | None] = []
        self._skipped: torch.Tensor | None = None
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- param groups & state

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch.optim rejects sets with its own message
            params = list(params)
        group["params"] = params
        _validate_group({**self.defaults, **group})
        for p in params:
            check_param(p[1] if isinstance(p, tuple) else p)
        super().add_param_group(group)
        self._invalidate()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # e.g. groups loaded from a torch.optim.Adam checkpoint
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("loss_group", "world")
        self.__dict__.setdefault("_skipped", None)
        self._invalidate()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("_packed", "_plans")}

    def _invalidate(self) -> None:
        """Forget flat buffers and tables; the next step rebuilds them from self.state."""
        self._packed = {}
        self._plans = [None] * len(self.param_groups)

    def state_dict(self) -> dict:
        """As torch.optim.Adam's, with each state tensor copied out of the flat buffers."""
        sd = super().state_dict()
        sd["state"] = {
            k: {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in st.items()}
            for k, st in sd["state"].items()
        }
        if self._skipped is not None:
            sd["adaml"] = {"skipped_steps": self._skipped.clone()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an AdamL or torch.optim.Adam state dict. Moments keep AdamL's dtype (float32)."""
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            raise ValueError(
                "loaded state dict has a different number of parameter groups or parameters"
            )
        id_map = dict(
            zip(
                chain.from_iterable(s["params"] for s in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        imported = {
            id_map[pid]: _import_param_state(id_map[pid], st)
            for pid, st in state_dict["state"].items()
            if pid in id_map
        }
        skipped = state_dict.get("adaml", {}).get("skipped_steps")
        # torch.optim's own loader handles groups and hooks; the state is ours to convert, so
        # it is not cast to the parameter dtype (which would round bf16 moments).
        super().load_state_dict({**state_dict, "state": {}})
        self.state.update(imported)
        self._skipped = None if skipped is None else skipped.to(torch.float64, copy=True)
        self._invalidate()

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped (non-finite loss or found_inf). Reading it syncs."""
        return 0 if self._skipped is None else round(self._skipped.item())

    # ----------------------------------------------------------------------------- step

    # Compiling this host-side bookkeeping gains nothing (the update is one fused launch per
    # bucket), so a torch.compile'd training step calls it eagerly.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, loss=None, closure: Callable | None = None):
        """Take one AdamL step. Pass the loss (tensor or number) or a closure returning it."""
        if callable(loss):
            loss, closure = None, loss
        if closure is not None:
            if loss is not None:
                raise TypeError("step() takes the loss or a closure, not both")
            with torch.enable_grad():
                loss = closure()
        _check_loss(loss)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        # Check everything before anything changes: a step that cannot be taken changes nothing.
        changes = {}  # group index -> ("grads" or "all", its params, their grads)
        for gi in range(len(self.param_groups)):
            params, grads = self._active(gi)
            change = self._plan_change(gi, params, grads)
            if change == "grads":
                self._validate_new_grads(gi, grads)
            elif change == "all":
                self._validate_group_tensors(gi, params, grads)
            if change is not None:
                changes[gi] = (change, params, grads)
        loss_group = _loss_process_group(self.loss_group)
        if not isinstance(loss, torch.Tensor) and not math.isfinite(loss) and loss_group is None:
            self._count_skip(None)  # a skipped step changes no parameter or state
            return loss  # (under loss averaging every rank must still join the all-reduce)
        for gi, (change, params, grads) in changes.items():
            if change == "grads":
                self._replace_grads(gi, params, grads)
            else:
                self._rebuild_plan(gi, params, grads)

        loss_t = self._loss_tensor(loss, loss_group)
        take = decide_take(loss_t, found_inf)
        for gi, group in enumerate(self.param_groups):
            plan = self._plans[gi]
            if plan.buckets:
                run_buckets(plan.buckets, Hyperparams.from_group(group), loss_t, take, grad_scale)
        self._count_skip(take)
        return loss

    def _loss_tensor(self, loss, group) -> torch.Tensor:
        """The loss as a 0-dim tensor, averaged over `group` when there is one."""
        device = self._first_device()
        if isinstance(loss, torch.Tensor):
            loss_t = loss.detach() if loss.dim() == 0 else loss.detach().reshape(())
            if not loss_t.is_floating_point():
                loss_t = loss_t.to(torch.float32)
        else:
            loss_t = torch.tensor(float(loss), dtype=torch.float64, device=device)
        if group is not None:
            import torch.distributed as dist

            loss_t = loss_t.to(device, dtype=torch.float32, copy=True)
            dist.all_reduce(loss_t, op=dist.ReduceOp.SUM, group=group)
            loss_t /= dist.get_world_size(group)
        return loss_t

    def _first_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _count_skip(self, take: torch.Tensor | None) -> None:
        if self._skipped is None:
            device = take.device if take is not None else self._first_device()
            self._skipped = torch.zeros((), dtype=torch.float64, device=device)
        if take is None:
            self._skipped += 1
        else:  # skipped += 1 - take, in place on the device
            self._skipped.sub_(take.to(self._skipped.device, non_blocking=True)).add_(1)

    # ------------------------------------------------------------------ planning a group

    def _active(self, gi: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p for p in self.param_groups[gi]["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    def _plan_change(self, gi: int, params, grads) -> str | None:
        """None if the group's plan still holds, "grads" if only gradients moved, else "all"."""
        plan = self._plans[gi]
        if plan is None:
            return "all"
        if len(params) != len(plan.params) or not all(map(operator.is_, params, plan.params)):
            return "all"
        try:
            key = Bucket.storage_key(params, grads)
        except RuntimeError:  # e.g. a sparse gradient has no data pointer: revalidate
            return "all"
        if key == plan.key:
            return None
        return "grads" if key[: len(params)] == plan.key[: len(params)] else "all"

    def _validate_group_tensors(self, gi: int, params, grads) -> None:
        chosen = {}  # (device, dtype) -> backend name
        for p, g in zip(params, grads):
            check_param(p)
            check_grad(p, g)
            key = (p.device, p.dtype)
            if key not in chosen:
                chosen[key] = backends.select(self.backend, p.device, p.dtype)
            if backends.is_fused(chosen[key]):
                check_kernel_layout(p, [g], chosen[key])
            st = self.state.get(p)
            if st and "exp_avg" in st:
                for name in ("exp_avg", "exp_avg_sq"):
                    if st[name].shape != p.shape:
                        raise ValueError(
                            f"state {name!r} has shape {tuple(st[name].shape)}, "
                            f"its parameter {tuple(p.shape)}"
                        )

    def _validate_new_grads(self, gi: int, grads) -> None:
        """The parameters are those of the plan, unchanged: only their gradients are new."""
        plan = self._plans[gi]
        for (bucket, name), idx in zip(plan.buckets, plan.members):
            fused = backends.is_fused(name)
            for p, i in zip(bucket.params, idx):
                g = grads[i]
                check_grad(p, g)
                if fused and g.stride() != p.stride():
                    check_kernel_layout(p, [g], name)

    def _rebuild_plan(self, gi: int, params, grads) -> None:
        by_bucket: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_bucket.setdefault((p.device, p.dtype), []).append(i)
        buckets, members = [], []
        for (device, dtype), idx in by_bucket.items():
            self._pack_state(gi, device, dtype, [params[i] for i in idx])
            views = [self.state[params[i]] for i in idx]
            bucket = Bucket(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                *([st[key] for st in views]
                  for key in ("exp_avg", "exp_avg_sq", "step", "initial_loss")),
            )
            buckets.append((bucket, backends.select(self.backend, device, dtype)))
            members.append(idx)
        self._plans[gi] = _GroupPlan(params, Bucket.storage_key(params, grads), buckets, members)

    def _replace_grads(self, gi: int, params, grads) -> None:
        plan = self._plans[gi]
        for (bucket, _), idx in zip(plan.buckets, plan.members):
            bucket.replace_grads([grads[i] for i in idx])
        plan.key = Bucket.storage_key(params, grads)

    def _pack_state(self, gi, device, dtype, active: list[torch.Tensor]) -> None:
        """Lay out the state of (group, device, dtype) in flat buffers, unless it already is,
        with every parameter of `active` among its members."""
        key = (gi, device, dtype)
        if key in self._packed and all(id(p) in self._packed[key] for p in active):
            return
        # Members: every parameter of the bucket that has state, plus the active ones.
        active_ids = {id(p) for p in active}
        members = [
            p
            for p in self.param_groups[gi]["params"]
            if p.device == device and p.dtype == dtype
            and (id(p) in active_ids or "exp_avg" in self.state.get(p, {}))
        ]
        _pack(members, self.state)
        self._packed[key] = {id(p) for p in members}


def _validate_group(group: dict) -> None:
    validate_hyperparameters(
        group["lr"], group["betas"], group["eps"], group["gamma"], group["phi"],
        group["loss_offset"], group["normalize_loss"], group["weight_decay"],
        group["decoupled_weight_decay"], group["maximize"],
    )


def _loss_process_group(loss_group):
    if loss_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if loss_group == "world" else loss_group
    return group if dist.get_world_size(group) > 1 else None


def _import_param_state(p: torch.Tensor, saved: dict) -> dict:
    """A saved per-parameter state (AdamL's or torch.optim.Adam's) on p's device, AdamL dtypes."""
    mdt = moment_dtype(p.dtype)
    out = {}
    for key, value in saved.items():
        if key in ("exp_avg", "exp_avg_sq"):
            if value.shape != p.shape:
                raise ValueError(
                    f"saved {key!r} has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}"
                )
            value = value.to(device=p.device, dtype=mdt, copy=True)
        elif key == "step":
            value = torch.as_tensor(value, dtype=torch.float32).to(p.device, copy=True)
        elif key == "initial_loss":
            value = torch.as_tensor(value, dtype=mdt).to(p.device, copy=True)
        elif isinstance(value, torch.Tensor):
            value = value.to(p.device, copy=True)  # e.g. Adam's max_exp_avg_sq, kept as is
        out[key] = value
    return out


def _pack(members: list[torch.Tensor], state) -> None:
    """Lay the state of `members` out in flat buffers and make their state entries views of them.

    Existing values (from earlier steps or a loaded checkpoint) are copied in; new parameters
    start with zero moments, step 0 and no f_1.
    """
    device, dtype = members[0].device, members[0].dtype
    mdt = moment_dtype(dtype)
    element = torch.empty((), dtype=mdt).element_size()
    align = _ALIGN_BYTES // element
    offsets, total = [], 0
    for p in members:
        offsets.append(total)
        total += -(-p.numel() // align) * align
    # One buffer: every exp_avg, a gap, then every exp_avg_sq at the same offsets.
    second_row = total + _ROW_GAP_BYTES // element
    buffer = torch.zeros(second_row + total, dtype=mdt, device=device)
    steps = torch.zeros(len(members), dtype=torch.float32, device=device)
    initial_losses = torch.full((len(members),), math.nan, dtype=mdt, device=device)
    for i, (p, off) in enumerate(zip(members, offsets)):
        st = state[p]
        # Same strides as the parameter, so element i of the moments belongs to element i of
        # the parameter in memory order too (channels_last weights, transposed views).
        stride = p.stride() if is_dense(p) else torch.empty(p.shape, device="meta").stride()
        views = {
            "step": steps[i],
            "exp_avg": buffer.as_strided(p.shape, stride, off),
            "exp_avg_sq": buffer.as_strided(p.shape, stride, second_row + off),
            "initial_loss": initial_losses[i],
        }
        for key, view in views.items():
            if key in st:
                view.copy_(st[key])
            st[key] = view
