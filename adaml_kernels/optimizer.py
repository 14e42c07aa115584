"""AdamL as a torch.optim.Optimizer: a drop-in for torch.optim.Adam that also takes the loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from itertools import chain

import torch
import torch.optim.optimizer as _optim_module

from . import backends, loss as losses, plan as planning
from .fast_path import FALLBACK, FastPath
from .hyperparams import DEFAULTS, Hyperparams, validate_group
from .loss import StepInputs
from .precision import MASTER_KEY, Precision
from .state import TrackedState, copy_out, first_value, hooks_held, import_param_state
from .tensor_checks import check_param


class AdamL(torch.optim.Optimizer):
    """AdamL (Xia & Massei, arXiv 2312.15295): Adam whose second moment uses the loss.

        w = b2*w + (1 - b2)*g^2 / (gamma * l^phi) + eps*l,    l = max(loss - loss_offset, 1e-12)

    Hand it the loss whose gradients are in .grad: ``opt.step(loss)`` after ``loss.backward()``,
    ``opt.step(closure)``, or ``opt.add_loss(loss)`` after each backward and then ``opt.step()``
    (for loops that call step() without arguments; under gradient accumulation the registered
    losses are summed, as their gradients are). The loss may be a 0-dim tensor (never read on the
    host) or a number. A step with a non-finite loss, or one that torch.amp.GradScaler flags with
    found_inf, is skipped and changes nothing. A step with no gradient at all does nothing.

    Args beyond torch.optim.Adam's:
        gamma, phi: the adaptive term is divided by gamma * l^phi.
        loss_offset: f*, the optimal loss or a lower bound of it.
        normalize_loss: divide loss - f* by f_1 - f*, f_1 being the loss of the first step.
        backend: "auto", "reference", "triton", "cpu" or "cuda" (see available_backends()).
        loss_group: under torch.distributed, the losses of this process group are averaged so
            that every rank uses the same l. "world" (default) uses the default group when
            torch.distributed is initialized; None turns the averaging off.
        amp_scaling: True (default): torch.amp.GradScaler hands AdamL the scale and found_inf,
            and the kernels unscale the gradients in the update (no extra pass, no sync).
            False: GradScaler unscales the gradients itself and skips steps with inf/NaN
            gradients before step() is called, as for any optimizer; for loops and frameworks
            that must see unscaled gradients themselves (e.g. to clip them).
        stochastic_rounding: round what is stored as bf16 (bf16 parameters, bf16 moments)
            stochastically, so that updates below half an ulp still move it on average.
        master_weights: keep a float32 copy of each fp16/bf16 parameter (state key
            "master_param"); the step updates the copy and writes the rounded parameter.
        state_dtype: the moments' dtype, None (float32) or torch.bfloat16 (half the memory).
        seed: the seed of stochastic rounding's random bits (saved with the state).

    State: per parameter, torch.optim.Adam's ``step``, ``exp_avg`` and ``exp_avg_sq`` (views of
    flat per-bucket buffers; modify them in place or through load_state_dict),
    ``initial_loss``: f_1, one float64 value for the whole optimizer (NaN until the first step
    taken), the same tensor in every parameter's state, and under master_weights
    ``master_param`` (float32) for fp16/bf16 parameters.
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
        amp_scaling: bool = True,
        stochastic_rounding: bool = False,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        seed: int = 0,
    ):
        backends.check_name(backend)
        precision = Precision(stochastic_rounding, master_weights, state_dtype, seed)
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
        validate_group(defaults)
        if not isinstance(amp_scaling, bool):
            raise ValueError(f"Invalid amp_scaling: {amp_scaling!r} (must be a bool)")
        self.backend = backend
        self.loss_group = loss_group
        self.precision = precision
        self._step_supports_amp_scaling = amp_scaling  # read by torch.amp.GradScaler
        self._reset_runtime()
        self._skipped: torch.Tensor | None = None
        self._initial_loss: torch.Tensor | None = None
        super().__init__(params, defaults)
        self.state = TrackedState(self.state)

    def _reset_runtime(self) -> None:
        """Forget plans, flat-buffer records and pending losses (none of them is saved)."""
        # (group, device, dtype) -> ids of the parameters whose state is packed in flat buffers
        self._packed: dict[tuple, set[int]] = {}
        self._plans: list[planning.GroupPlan | None] = []
        self._planned_state_version = -1  # self.state's version when the plans were made
        self._pending = losses.PendingLoss()
        self._taken: torch.Tensor | None = None
        self._fast: FastPath | None = None  # the steady-state path, while the plans hold

    # ----------------------------------------------------------------- param groups & state

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch.optim rejects sets with its own message
            params = list(params)
        group["params"] = params
        validate_group({**self.defaults, **group})
        for p in params:
            check_param(p[1] if isinstance(p, tuple) else p)
        super().add_param_group(group)
        self._invalidate()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.state = TrackedState(self.state)
        # Only AdamL's own keys: torch's __setstate__ adds "differentiable" to the defaults,
        # which must not reach the groups (it would change the saved schema).
        for group in self.param_groups:  # e.g. groups loaded from a torch.optim.Adam checkpoint
            for key in DEFAULTS:
                group.setdefault(key, self.defaults[key])
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("loss_group", "world")
        self.__dict__.setdefault("_skipped", None)
        self.__dict__.setdefault("_initial_loss", None)
        self.__dict__.setdefault("_step_supports_amp_scaling", True)
        self.__dict__.setdefault("precision", Precision())
        self._reset_runtime()
        self._invalidate()

    def __getstate__(self) -> dict:
        # torch.optim keeps only defaults, state and param_groups; AdamL's settings and
        # counters travel too (deepcopy, pickle). Plans and pending losses are rebuilt.
        return {
            **super().__getstate__(),
            "backend": self.backend,
            "loss_group": self.loss_group,
            "_step_supports_amp_scaling": self._step_supports_amp_scaling,
            "precision": self.precision,
            "_skipped": self._skipped,
            "_initial_loss": self._initial_loss,
        }

    def _invalidate(self) -> None:
        """Forget flat buffers and tables; the next step rebuilds them from self.state."""
        self._packed = {}
        self._plans = [None] * len(self.param_groups)
        self._planned_state_version = -1
        self._fast = None

    def state_dict(self) -> dict:
        """As torch.optim.Adam's, with each state tensor copied out of the flat buffers."""
        sd = super().state_dict()
        sd["state"] = {k: copy_out(v) for k, v in sd["state"].items()}
        if self.precision.stochastic_rounding:
            sd["adaml"] = {"seed": self.precision.seed}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an AdamL or torch.optim.Adam state dict. Moments take AdamL's dtype (float32, or
        state_dtype), master weights float32; a saved seed replaces this optimizer's.

        torch.optim's loader would cast the state to the parameters' dtype (rounding moments of
        bf16 parameters), so AdamL converts the state itself and runs the hooks around that,
        as torch.optim does: pre-hooks see the state dict first, post-hooks the loaded state.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
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
        imported = {}
        for key, st in state_dict["state"].items():
            if key in id_map:
                imported[id_map[key]] = import_param_state(
                    id_map[key], st, self.precision.state_dtype)
            else:  # torch.optim keeps state that belongs to no parameter as it is
                imported[key] = st
        device = self._home_device()
        shared = {
            "initial_loss": first_value(imported.values(), "initial_loss", device),
            # (checkpoints before the count moved into the state kept it beside it)
            "skipped_steps": first_value(imported.values(), "skipped_steps", device)
            if "skipped_steps" not in state_dict.get("adaml", {}) else
            state_dict["adaml"]["skipped_steps"].to(device, torch.float64, copy=True),
        }
        seed = state_dict.get("adaml", {}).get("seed")
        if seed is not None:
            self.precision = dataclasses.replace(self.precision, seed=int(seed))
        with hooks_held(self):
            super().load_state_dict({**state_dict, "state": {}})
        self.state.update(imported)
        self._initial_loss, self._skipped = shared["initial_loss"], shared["skipped_steps"]
        for st in self.state.values():
            if isinstance(st, dict) and "step" in st:
                self._share_scalars(st)
        self._invalidate()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @torch.no_grad()
    def sync_master_weights(self) -> None:
        """Set each master weight (master_weights=True) to its parameter's current value.

        The master weight is the parameter's true value: a step writes the parameter from it.
        Call this after changing fp16/bf16 parameters outside the optimizer (e.g.
        model.load_state_dict without the optimizer's state), or the next step undoes it."""
        for group in self.param_groups:
            for p in group["params"]:
                x = self.state.get(p, {}).get(MASTER_KEY)
                if x is not None:
                    x.copy_(p.detach())

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped (non-finite loss or found_inf). Reading it syncs."""
        return 0 if self._skipped is None else round(self._skipped.item())

    @property
    def last_step_taken(self) -> torch.Tensor | None:
        """Whether the last step was taken: a 0-dim bool tensor on the device (reading it on
        the host syncs), None before the first step. A loop can hold its LR scheduler with it,
        e.g. by scaling the scheduler's step on the device."""
        return None if self._taken is None else self._taken != 0

    def describe(self) -> list[list[dict]]:
        """Per param group, the buckets of its current plan: backend, device, dtype, tensors and
        elements. Empty for a group that has not been stepped with gradients yet."""
        return [[] if plan is None else plan.describe() for plan in self._plans]

    # ----------------------------------------------------------------------------- loss

    def add_loss(self, loss) -> None:
        """Register the loss of a backward pass; the next step() without a loss uses the sum of
        the losses registered since the last step or zero_grad(). Nothing is read on the host."""
        self._pending.add(loss)

    @torch.compiler.disable  # as torch.optim's zero_grad
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, and forget the losses registered since the last step: they belong to
        the gradients being zeroed. (A step that GradScaler skips with amp_scaling=False never
        reaches AdamL, so without this its losses would be added to the next step's.)"""
        self._pending.take()
        super().zero_grad(set_to_none)

    # ----------------------------------------------------------------------------- step

    def step(self, loss=None, closure: Callable | None = None):
        """Take one AdamL step and return the loss used (a closure's result if there is one).

        The loss is, in this order: what the closure returns, `loss`, or the sum of the losses
        registered with add_loss() since the last step.
        """
        # torch.optim wraps every step in a profiler range and its hook loops; that costs about
        # 8 us a step, as much as AdamL's whole step in steady state, so AdamL takes the same
        # wrapper only when a hook is registered or the profiler is on.
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _optim_module._global_optimizer_pre_hooks
                or _optim_module._global_optimizer_post_hooks
                or torch._C._autograd._profiler_enabled()):
            given = (loss, closure) if closure is not None else (loss,) if loss is not None else ()
            return self._step_with_hooks(*given)
        return self._step(loss, closure)

    step.hooked = True  # tells torch.optim not to wrap it again

    def _step(self, loss=None, closure: Callable | None = None):
        if not torch.compiler.is_compiling() and self._fast is not None and closure is None \
                and not callable(loss):
            result = self._fast.step(self, loss)
            if result is not FALLBACK:
                return result
        return self._general_step(loss, closure)

    _step_with_hooks = torch.optim.Optimizer.profile_hook_step(_step)

    # Compiling this host-side bookkeeping gains nothing (the update is one fused launch per
    # bucket), so a torch.compile'd training step calls it eagerly.
    @torch.compiler.disable
    @torch.no_grad()
    def _general_step(self, loss=None, closure: Callable | None = None):
        """The step on the general path: everything checked, planned and launched from Python."""
        self._fast = None
        if callable(loss):
            loss, closure = None, loss
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if result is not None:
                loss = result
        actives = [self._active(gi) for gi in range(len(self.param_groups))]
        if loss is None and self._pending.total is not None:
            loss = self._pending.total
        if not any(params for params, _ in actives):
            self._pending.take()
            return loss  # no gradient anywhere: nothing to do, as in torch.optim
        if loss is None and _every_lr_is_zero(self.param_groups):
            # torch.distributed.checkpoint makes a new optimizer's state with a step of zero
            # gradients, lr 0 and no loss: make the state, change nothing else.
            self._apply(self._changes(actives))
            return None
        losses.check_loss(loss)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        changes = self._changes(actives)  # everything is checked before anything changes
        self._pending.take()
        group = losses.process_group(self.loss_group)
        if losses.is_nonfinite_number(loss) and group is None:
            # Skipped on the host alone (under loss averaging every rank must join the
            # all-reduce, so there the skip is decided on the device).
            self._count_skip(None)
            self._taken = torch.zeros((), dtype=torch.float32, device=self._home_device())
            return loss
        self._apply(changes)

        inputs = self._step_inputs(loss, group, grad_scale, found_inf)
        on_device = {}
        for gi, group_dict in enumerate(self.param_groups):
            plan = self._plans[gi]
            if plan is not None and plan.buckets and actives[gi][0]:
                planning.run(plan.buckets, Hyperparams.from_group(group_dict), inputs, on_device)
        self._count_skip(inputs.take)
        self._fast = FastPath.build(self)
        return loss

    def _changes(self, actives) -> dict:
        """What each group's plan needs (checked; raises before anything changes): group index
        -> ("grads" or "all", its params, their grads, their backends)."""
        if self.state.version != self._planned_state_version:  # a state entry set or deleted
            self._invalidate()
        changes = {}
        for gi, (params, grads) in enumerate(actives):
            plan = self._plans[gi]
            change = "all" if plan is None else plan.change(params, grads)
            if change == "grads" and not plan.new_grads_fit(grads, self.backend):
                change = "all"
            if change == "all":
                names = planning.check_group(params, grads, self.state, self.backend,
                                             self.precision)
                changes[gi] = (change, params, grads, names)
            elif change == "grads":
                changes[gi] = (change, params, grads, None)
        return changes

    def _apply(self, changes: dict) -> None:
        for gi, (change, params, grads, names) in changes.items():
            if change == "grads":
                self._plans[gi].replace_grads(grads)
            else:
                self._plans[gi] = planning.make_group_plan(
                    params, grads, names, self.state, self.param_groups[gi]["params"],
                    self._packed, gi, self.precision, self._param_indices())
                for p in params:
                    self._share_scalars(self.state[p])
        self._planned_state_version = self.state.version

    def _step_loss(self, loss, group, device: torch.device) -> torch.Tensor:
        """The loss this step uses (both paths): 0-dim, on `device`, averaged over `group`."""
        loss_t = losses.as_tensor(loss, device)
        return loss_t if group is None else losses.average(loss_t, group)

    def _step_inputs(self, loss, group, grad_scale, found_inf) -> StepInputs:
        """The loss (averaged over `group`), the skip decision and f_1, on the home device."""
        loss_t = self._step_loss(loss, group, self._initial_loss.device)
        take = losses.decide_take(loss_t, found_inf)
        losses.record_initial_loss(self._initial_loss, loss_t, take)
        self._taken = take
        return StepInputs(loss_t, take, grad_scale, self._initial_loss)

    def _param_indices(self) -> dict[int, int]:
        """id(p) -> the parameter's index in the optimizer: its position across all param groups
        (the key of its entry in state_dict()["state"]), stochastic rounding's j."""
        return {id(p): i for i, p in enumerate(chain.from_iterable(
            g["params"] for g in self.param_groups))}

    def _active(self, gi: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p for p in self.param_groups[gi]["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    def _home_device(self) -> torch.device:
        """Where f_1, the skip decision and the skip count live: the first parameter's device."""
        if self._initial_loss is not None:
            return self._initial_loss.device
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _share_scalars(self, st: dict) -> None:
        """Put the optimizer's f_1 and skip count into a parameter's state: the same tensors in
        every entry, so that they are saved wherever the state goes (DCP keeps only `state`
        and `param_groups`)."""
        if self._initial_loss is None:
            self._initial_loss = losses.new_initial_loss(self._home_device())
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.float64, device=self._home_device())
        st["initial_loss"] = self._initial_loss
        st["skipped_steps"] = self._skipped

    def _count_skip(self, take: torch.Tensor | None) -> None:
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.float64, device=self._home_device())
        if take is None:
            self._skipped += 1
        else:  # skipped += 1 - take, in place on the device
            self._skipped.sub_(losses.move(take, self._skipped.device)).add_(1)


def _every_lr_is_zero(groups) -> bool:
    """Whether every group's lr is 0 (a tensor lr is read only if it is on the CPU)."""
    def zero(lr):
        if isinstance(lr, torch.Tensor):
            return lr.device.type == "cpu" and float(lr) == 0.0
        return lr == 0

    return all(zero(g["lr"]) for g in groups)
