"""AdamL as a torch.optim.Optimizer: a drop-in for torch.optim.Adam that also takes the loss."""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from itertools import chain

import torch
import torch.optim.optimizer as _optim_module

from . import backends
from .engine import StepEngine
from .fast_path import FALLBACK
from .grad_release import DEFAULT_BUCKET_CAP_MB, GradientRelease, ReleaseHooks, check_bucket_cap
from .hyperparams import DEFAULTS, validate_group
from .precision import MASTER_KEY, Precision
from .state import TrackedState, first_value, import_param_state, saved_scalar
from .telemetry import Telemetry
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
        stochastic_rounding: round what is stored as bf16 (bf16 parameters, bf16 moments) or
            as 8-bit codes stochastically, so that updates below half an ulp (or half a code
            step) still move it on average.
        master_weights: keep a float32 copy of each fp16/bf16 parameter (state key
            "master_param"); the step updates the copy and writes the rounded parameter.
        state_dtype: the moments' dtype, None (float32), torch.bfloat16 (half the memory) or
            torch.uint8 (8-bit block-quantized moments, about a quarter; use them with
            stochastic_rounding=True, docs/low_precision.md).
        seed: the seed of stochastic rounding's random bits (saved with the state).
        gradient_release: step each bucket during backward, as soon as all of its gradients
            are complete, and free those gradients (docs/gradient_release.md): call
            ``opt.add_loss(loss)`` before ``loss.backward()``, then ``opt.step()``; accumulation
            micro-batches run inside ``with opt.no_release():``. Under FSDP2 the buckets step
            after its reduce-scatter; under DDP call ``opt.register_ddp(ddp_model)`` once.
        bucket_cap_mb: under gradient_release, the most gradient bytes (MiB) of one bucket, and
            so about how many gradients are alive at once (default 25; a larger tensor gets a
            bucket of its own).
        telemetry: the kernels also measure, per param group, the share of SGD-like elements,
            the update's RMS, the share of lost fp16/bf16 updates and of saturated w; read them
            with ``opt.telemetry()`` (docs/telemetry.md). Off (default): compiled out.

    State: per parameter, torch.optim.Adam's ``step``, ``exp_avg`` and ``exp_avg_sq`` (views of
    flat per-bucket buffers; modify them in place or through load_state_dict),
    ``initial_loss``: f_1, one float64 value for the whole optimizer (NaN until the first step
    taken), the same tensor in every parameter's state, and under master_weights
    ``master_param`` (float32) for fp16/bf16 parameters.

    The runtime of the steps (plans, flat buffers, tables, the fast path, pending losses, f_1
    and the skip count) belongs to ``self.engine`` (engine.StepEngine).
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
        gradient_release: bool = False,
        bucket_cap_mb: float | None = None,
        telemetry: bool = False,
    ):
        backends.check_name(backend)
        precision = Precision(stochastic_rounding, master_weights, state_dtype, seed)
        if not isinstance(gradient_release, bool):
            raise ValueError(f"Invalid gradient_release: {gradient_release!r} (must be a bool)")
        if bucket_cap_mb is not None and not gradient_release:
            raise ValueError("bucket_cap_mb sizes gradient release's buckets: it needs "
                             "gradient_release=True")
        if gradient_release and amp_scaling is False:
            raise ValueError(
                "gradient_release=True cannot be combined with amp_scaling=False: GradScaler "
                "unscales and checks the gradients after backward, once the buckets have "
                "stepped and freed them")
        if not isinstance(telemetry, bool):
            raise ValueError(f"Invalid telemetry: {telemetry!r} (must be a bool)")
        if telemetry and gradient_release:
            raise ValueError("telemetry=True cannot be combined with gradient_release=True yet: "
                             "the buckets of a group step apart, during backward")
        release_cap = None if not gradient_release else check_bucket_cap(
            DEFAULT_BUCKET_CAP_MB if bucket_cap_mb is None else bucket_cap_mb)
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
        self.amp_scaling = amp_scaling
        self._release_hooks = None if release_cap is None else _new_hooks(self)
        self.engine = StepEngine(backend, loss_group, precision, _release(
            release_cap, self._release_hooks), Telemetry() if telemetry else None)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------- settings

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def loss_group(self):
        return self.engine.loss_group

    @property
    def precision(self) -> Precision:
        return self.engine.precision

    @property
    def amp_scaling(self) -> bool:
        """Whether torch.amp.GradScaler hands AdamL grad_scale and found_inf (see the class
        docstring). A framework that clips unscaled gradients may turn it off before a step."""
        return self._step_supports_amp_scaling

    @amp_scaling.setter
    def amp_scaling(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"Invalid amp_scaling: {value!r} (must be a bool)")
        if not value and self.__dict__.get("_release_hooks") is not None:
            raise ValueError("amp_scaling=False cannot be combined with gradient release "
                             "(see AdamL's gradient_release)")
        self._step_supports_amp_scaling = value  # read by torch.amp.GradScaler

    @property
    def gradient_release(self) -> bool:
        return self.engine.release is not None

    @property
    def telemetry_enabled(self) -> bool:
        """Whether the kernels measure the figures telemetry() returns (telemetry=True)."""
        return self.engine.telemetry is not None

    @property
    def bucket_cap_mb(self) -> float | None:
        """Gradient release's bucket size in MiB of gradient (None without gradient release)."""
        release = self.engine.release
        return None if release is None else release.bucket_cap_mb

    def no_release(self) -> AbstractContextManager:
        """Under gradient release, backward passes inside this context only accumulate their
        gradients (accumulation micro-batches); register each one's loss with add_loss, as
        always. The backward after it steps the buckets, with the sum of the losses."""
        if self.engine.release is None:
            raise RuntimeError("no_release() needs AdamL(..., gradient_release=True)")
        return self.engine.release.no_release()

    def register_ddp(self, ddp_model) -> None:
        """Under gradient release, step the buckets of a DistributedDataParallel model's
        parameters once DDP has all-reduced their gradients (docs/gradient_release.md, DDP):
        AdamL registers its communication hook on `ddp_model` (in place of DDP's default
        all-reduce, with the same result) and DDP no longer writes the reduced gradients into
        .grad. Call it once, before the first backward."""
        self.engine.register_ddp(ddp_model, partial(_ddp_bucket_reduced, weakref.ref(self)),
                                 self.param_groups)

    @property
    def state(self) -> TrackedState:
        return self._tracked_state

    @state.setter
    def state(self, value) -> None:
        # torch.optim's state is a defaultdict(dict); a new one (a reset) is tracked too.
        self._tracked_state = value if isinstance(value, TrackedState) else TrackedState(value)

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
        if self.__dict__.get("_release_hooks") is not None:
            self._release_hooks.add(group["params"])
        self.engine.invalidate()

    def __getstate__(self) -> dict:
        # torch.optim keeps only defaults, state and param_groups; AdamL's settings and
        # counters travel too (deepcopy, pickle). Plans and pending losses are rebuilt.
        engine = self.engine
        return {
            **super().__getstate__(),
            "backend": engine.backend,
            "loss_group": engine.loss_group,
            "_step_supports_amp_scaling": self._step_supports_amp_scaling,
            "precision": engine.precision,
            "_skipped": engine.skipped,
            "_initial_loss": engine.initial_loss,
            "_bucket_cap_mb": None if engine.release is None else engine.release.bucket_cap_mb,
            "_telemetry": engine.telemetry is not None,
        }

    def __setstate__(self, state: dict) -> None:
        # Called by unpickling and deepcopy (with __getstate__'s keys) and by torch.optim's
        # load_state_dict (with state and param_groups only: the settings stay as they are).
        state = dict(state)
        engine = self.__dict__.get("engine")
        current = ("auto", "world", Precision(), None, None, True, None, False) \
            if engine is None else (
                engine.backend, engine.loss_group, engine.precision, engine.skipped,
                engine.initial_loss, self._step_supports_amp_scaling,
                None if engine.release is None else engine.release.bucket_cap_mb,
                engine.telemetry is not None)
        saved = {key: state.pop(key, default) for key, default in zip(
            ("backend", "loss_group", "precision", "_skipped", "_initial_loss",
             "_step_supports_amp_scaling", "_bucket_cap_mb", "_telemetry"), current)}
        tracked = state.pop("state", None)
        super().__setstate__(state)
        self.state = {} if tracked is None else tracked
        # Only AdamL's own keys: torch's __setstate__ adds "differentiable" to the defaults,
        # which must not reach the groups (it would change the saved schema).
        for group in self.param_groups:  # e.g. groups loaded from a torch.optim.Adam checkpoint
            for key in DEFAULTS:
                group.setdefault(key, self.defaults[key])
        self._step_supports_amp_scaling = saved["_step_supports_amp_scaling"]
        release_cap = saved["_bucket_cap_mb"]
        if release_cap is not None and self.__dict__.get("_release_hooks") is None:
            # a copy (deepcopy, unpickling): its own parameters get hooks
            self._release_hooks = _new_hooks(self)
            for group in self.param_groups:
                self._release_hooks.add(group["params"])
        elif release_cap is None:
            self._release_hooks = None
        # (load_state_dict keeps the figures measured so far; a copy starts afresh)
        telemetry = None if not saved["_telemetry"] else (
            engine.telemetry if engine is not None and engine.telemetry is not None
            else Telemetry())
        self.engine = StepEngine(saved["backend"], saved["loss_group"], saved["precision"],
                                 _release(release_cap, self._release_hooks), telemetry)
        self.engine.load_scalars(saved["_initial_loss"], saved["_skipped"])

    def state_dict(self) -> dict:
        """As torch.optim.Adam's: the state tensors themselves (views of the flat buffers, no
        copy; later steps change them, as torch's do), with f_1 and the skip count as numbers
        (so that they survive a torch.optim.Adam round trip)."""
        sd = super().state_dict()
        numbers = {}  # f_1 and the skip count: tensors shared by every entry, read once each

        def saved(key, value):
            if key in ("initial_loss", "skipped_steps") and isinstance(value, torch.Tensor):
                if (key, value.data_ptr()) not in numbers:
                    numbers[key, value.data_ptr()] = saved_scalar(value)
                return numbers[key, value.data_ptr()]
            return value

        sd["state"] = {i: {k: saved(k, v) for k, v in st.items()} if isinstance(st, dict)
                       else st for i, st in sd["state"].items()}
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
        device = self.engine.home_device(self.param_groups)
        initial_loss = first_value(imported.values(), "initial_loss", device)
        adaml = state_dict.get("adaml", {})
        # (checkpoints before the count moved into the state kept it beside it)
        skipped = first_value(imported.values(), "skipped_steps", device) \
            if "skipped_steps" not in adaml else \
            adaml["skipped_steps"].to(device, torch.float64, copy=True)
        if adaml.get("seed") is not None:
            self.engine.set_precision(dataclasses.replace(self.precision, seed=int(adaml["seed"])))
        pre, post = self._optimizer_load_state_dict_pre_hooks, \
            self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:  # torch.optim's loader for the groups, without its hooks (run here instead)
            super().load_state_dict({**state_dict, "state": {}})
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        self.state.update(imported)
        self.engine.load_scalars(initial_loss, skipped)
        for st in self.state.values():
            if isinstance(st, dict) and "step" in st:
                self.engine.share_scalars(st, self.param_groups)
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
        skipped = self.engine.skipped
        return 0 if skipped is None else round(skipped.item())

    @property
    def last_step_taken(self) -> torch.Tensor | None:
        """Whether the last step was taken: a 0-dim bool tensor on the device (reading it on
        the host syncs), None before the first step. A loop can hold its LR scheduler with it,
        e.g. by scaling the scheduler's step on the device."""
        taken = self.engine.taken
        return None if taken is None else taken != 0

    @property
    def initial_loss(self) -> torch.Tensor | None:
        """f_1: the loss of the first step taken (float64, 0-dim, on the device; NaN until
        then), None before the first step."""
        return self.engine.initial_loss

    def describe(self) -> list[list[dict]]:
        """Per param group, the buckets of its current plan: backend, device, dtype, tensors and
        elements. Empty for a group that has not been stepped with gradients yet."""
        return self.engine.describe(len(self.param_groups))

    def telemetry(self) -> list[dict[str, torch.Tensor]]:
        """Per param group, the figures of its last step taken (SPEC.md, Telemetry), as 0-dim
        tensors on the device (reading one is the caller's sync; the step never syncs):
        ``sgd_like_fraction``, ``update_rms``, ``lost_update_fraction``, ``saturated_fraction``,
        over the group's ``elements`` updated in that step. NaN before the group's first step
        taken, and after a step in which it updated no element. Needs telemetry=True.
        (docs/telemetry.md; telemetry.all_reduce combines the ranks' figures.)"""
        engine = self.engine
        if engine.telemetry is None:
            raise RuntimeError("telemetry() needs AdamL(..., telemetry=True)")
        return engine.telemetry.of_groups(len(self.param_groups),
                                          engine.home_device(self.param_groups))

    # ----------------------------------------------------------------------------- loss

    def add_loss(self, loss) -> None:
        """Register the loss of a backward pass; the next step() without a loss uses the sum of
        the losses registered since the last step or zero_grad(). Nothing is read on the host."""
        self.engine.add_loss(loss, self.param_groups)

    @property
    def pending_loss(self) -> torch.Tensor | None:
        """The sum of the losses registered since the last step (float64, 0-dim), or None."""
        return self.engine.pending.total

    @torch.compiler.disable  # as torch.optim's zero_grad
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim's, and forget the losses registered since the last step: they belong to
        the gradients being zeroed. (A step that GradScaler skips with amp_scaling=False never
        reaches AdamL, so without this its losses would be added to the next step's.)"""
        self.engine.drop_pending()
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
        engine = self.engine
        if engine.release is not None:
            return engine.release_step(self.param_groups, self.state, loss, closure,
                                       getattr(self, "grad_scale", None),
                                       getattr(self, "found_inf", None))
        if engine.fast is not None and closure is None and not callable(loss) \
                and not torch.compiler.is_compiling():
            result = engine.fast_step(self.param_groups, self.state, loss,
                                      getattr(self, "grad_scale", None),
                                      getattr(self, "found_inf", None))
            if result is not FALLBACK:
                return result
        return self._general_step(loss, closure)

    _step_with_hooks = torch.optim.Optimizer.profile_hook_step(_step)

    # Compiling this host-side bookkeeping gains nothing (the update is one fused launch per
    # bucket), so a torch.compile'd training step calls it eagerly.
    @torch.compiler.disable
    @torch.no_grad()
    def _general_step(self, loss=None, closure: Callable | None = None):
        if callable(loss):
            loss, closure = None, loss
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            if result is not None:
                loss = result
        # GradScaler sets grad_scale and found_inf on the optimizer around step().
        return self.engine.general_step(self.param_groups, self.state, loss,
                                        getattr(self, "grad_scale", None),
                                        getattr(self, "found_inf", None))


def _grad_ready(optimizer_ref, p) -> None:
    """A parameter's gradient of this backward is complete (gradient release)."""
    optimizer = optimizer_ref()
    if optimizer is not None:
        optimizer.engine.grad_ready(p, optimizer.param_groups, optimizer.state)


def _ddp_bucket_reduced(optimizer_ref, params, grads) -> bool:
    """DDP's all-reduce of a bucket is done (gradient release); False if the optimizer is
    gone."""
    optimizer = optimizer_ref()
    if optimizer is None:
        return False
    optimizer.engine.ddp_bucket_reduced(params, grads, optimizer.param_groups, optimizer.state)
    return True


def _new_hooks(optimizer: AdamL) -> ReleaseHooks:
    return ReleaseHooks(partial(_grad_ready, weakref.ref(optimizer)))


def _release(bucket_cap_mb: float | None, hooks: ReleaseHooks | None) -> GradientRelease | None:
    return None if bucket_cap_mb is None else GradientRelease(bucket_cap_mb, hooks)
