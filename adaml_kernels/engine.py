"""The step engine: everything an AdamL step needs at run time, owned by one optimizer.

AdamL (optimizer.py) is the torch.optim surface; it hands each step to its engine:

    AdamL.step -> StepEngine.fast_step      steady state: fast_path.py, a few C++ calls
               -> StepEngine.general_step   anything else: loss.py (check, settle), plan.py
                                            (check, lay out, run) -> backends -> kernel ops

The engine holds the plans and flat-buffer records (plan.py), the fast path, the losses
registered with add_loss(), f_1 and the skip count. f_1 and the skip count are also put into
every parameter's state (so that they are saved wherever the state goes); the rest is rebuilt
from the state when needed and never saved.

Under gradient release (grad_release.py) the buckets are launched from the parameters' hooks
during backward instead:

    hook of a bucket's last gradient -> StepEngine.grad_ready -> that bucket's launch
    DDP's all-reduce of a bucket     -> StepEngine.ddp_bucket_reduced -> grad_ready (ddp_release)
    AdamL.step -> StepEngine.release_step    the buckets still pending, the skip count

Under loss averaging the loss's all-reduce starts in add_loss (gradient release) and the
step's first launch waits on it.
"""

from __future__ import annotations

from itertools import chain

import torch

from . import ddp_release, loss as losses, plan as planning
from .ddp_release import write_back
from .fast_path import FALLBACK, FastPath
from .grad_release import NO_LOSS, GradientRelease
from .hyperparams import Hyperparams
from .loss import PendingLoss
from .precision import Precision
from .telemetry import Telemetry
from .tensor_checks import is_dtensor


class StepEngine:
    """The runtime of one optimizer's steps (see the module docstring)."""

    def __init__(self, backend: str, loss_group, precision: Precision,
                 release: GradientRelease | None = None, telemetry: Telemetry | None = None):
        self.release = release  # None: the ordinary step
        self.telemetry = telemetry  # None: the kernels measure nothing
        self.release_skips: torch.Tensor | None = None  # a launch's own skip count, unused
        self.backend = backend
        self.loss_group = loss_group
        self.precision = precision
        self.initial_loss: torch.Tensor | None = None  # f_1: float64, 0-dim, NaN until set
        self.skipped: torch.Tensor | None = None  # the skip count: float64, 0-dim
        self.taken: torch.Tensor | None = None  # float32 1.0/0.0: whether the last step was
        self.pending = PendingLoss()
        # id(p) -> a weak reference to the exp_avg laid out for p in a flat buffer (plan.pack_state;
        # kept through invalidate(): a replaced or emptied entry no longer holds that tensor)
        self.packed: dict = {}
        self.invalidate()

    def invalidate(self) -> None:
        """Forget plans and the fast path; the next step rebuilds them (and lays out again only
        the state that no longer fits)."""
        self.plans: list[planning.GroupPlan | None] = []
        self.planned_state = None  # the state (and its version) the plans were made from
        self.planned_state_version = -1
        self.fast: FastPath | None = None
        if self.release is not None:
            self.release.forget_plans()

    def set_precision(self, precision: Precision) -> None:
        self.precision = precision
        self.invalidate()

    # ----------------------------------------------------------------------------- loss

    def add_loss(self, loss, groups) -> None:
        release = self.release
        if release is not None and release.inputs is not None:
            raise RuntimeError(
                "gradient release: this step's buckets already stepped with the loss "
                "registered before; call opt.step() before registering the next step's loss")
        self.pending.add(loss)
        if release is not None and not release.accumulating:
            # Gradient release: the loss's all-reduce starts now, under backward; the step's
            # first launch waits on it. (Inside no_release() the losses are only summed: the
            # sum is averaged once, as in the ordinary step.)
            process_group = losses.process_group(self.loss_group)
            if process_group is not None:
                total = self.pending.total
                release.loss_average = (total, losses.LossAverage(
                    losses.as_tensor(total, self.home_device(groups)), process_group))

    def drop_pending(self) -> None:
        release = self.release
        if release is not None:
            if release.inputs is not None:
                raise RuntimeError(
                    "gradient release: buckets of this step were already updated during "
                    "backward; call opt.step() to finish the step before zero_grad()")
            release.end_step()
        self.pending.take()

    def step_loss(self, loss, group, device: torch.device) -> torch.Tensor:
        """The loss a step uses (both paths): 0-dim, on `device`, averaged over `group`."""
        loss_t = losses.as_tensor(loss, device)
        return loss_t if group is None else losses.average(loss_t, group)

    # ----------------------------------------------------------------------------- steps

    def fast_step(self, groups, state, loss, grad_scale, found_inf):
        """The steady-state step, or FALLBACK (nothing changed) where the general path must
        take it."""
        fast = self.fast
        if state is not self.planned_state or state.version != self.planned_state_version:
            return FALLBACK
        if loss is None:
            loss = self.pending.total
        if not fast.accepts(groups, loss, grad_scale, found_inf):
            return FALLBACK
        process_group = losses.process_group(self.loss_group)
        if process_group is None:  # one call: the gradients' check, then the step
            loss_t = self.step_loss(loss, None, fast.device)
            if not fast.run(groups, loss_t, grad_scale, found_inf, self.initial_loss,
                            self.skipped, refresh=True):
                return FALLBACK
        else:  # the gradients checked before the loss's all-reduce, which every rank joins
            if not fast.refresh_grads():
                return FALLBACK
            loss_t = self.step_loss(loss, process_group, fast.device)
            fast.run(groups, loss_t, grad_scale, found_inf, self.initial_loss, self.skipped,
                     refresh=False)
        for plan in self.plans:
            plan.grads_repointed()
        if self.telemetry is not None:
            self.telemetry.record([plan.buckets for plan in self.plans], fast.take)
        self.pending.take()
        self.taken = fast.take
        return loss

    def general_step(self, groups, state, loss, grad_scale, found_inf):
        """The step with everything checked, planned and launched from Python."""
        self.fast = None
        actives = [_active(group) for group in groups]
        if loss is None and self.pending.total is not None:
            loss = self.pending.total
        if not any(params for params, _ in actives):
            self.pending.take()
            return loss  # no gradient anywhere: nothing to do, as in torch.optim
        if loss is None and _every_lr_is_zero(groups):
            # torch.distributed.checkpoint makes a new optimizer's state with a step of zero
            # gradients, lr 0 and no loss: make the state, change nothing else.
            try:
                self._apply(self._changes(groups, state, actives), groups, state)
            finally:
                self._release_grads()
            return None
        losses.check_loss(loss)
        changes = self._changes(groups, state, actives)  # checked before anything changes
        self.pending.take()
        process_group = losses.process_group(self.loss_group)
        if losses.is_nonfinite_number(loss) and process_group is None:
            # Skipped on the host alone (under loss averaging every rank must join the
            # all-reduce, so there the skip is decided on the device).
            self._forget_scalars_of_a_reset_state(state)
            self._count_skip(None, groups)
            self.taken = torch.zeros((), dtype=torch.float32, device=self.home_device(groups))
            return loss
        try:
            self._apply(changes, groups, state)
            loss_t = self.step_loss(loss, process_group, self.initial_loss.device)
            inputs = losses.settle(loss_t, found_inf, grad_scale, self.initial_loss)
            self.taken = inputs.take
            on_device = {}
            launched = []
            for plan, group, (params, grads) in zip(self.plans, groups, actives):
                launched.append(None)
                if plan is not None and plan.buckets and params:
                    plan.attach_grads(grads)
                    planning.run(plan.buckets, Hyperparams.from_group(group), inputs, on_device)
                    launched[-1] = plan.buckets
            if self.telemetry is not None:
                self.telemetry.record(launched, inputs.take)
            self._count_skip(inputs.take, groups)
            self.fast = FastPath.build(groups, self.plans, self.initial_loss.device)
        finally:
            self._release_grads()
        return loss

    # ----------------------------------------------------------------- gradient release

    def grad_ready(self, p, groups, state, reduced: bool = False) -> None:
        """p's gradient of this backward is complete and reduced across the ranks (its
        post-accumulate-grad hook, or with `reduced` DDP's all-reduce): count it, and launch
        its bucket if that completes it. Most calls only count: grad mode is switched off for
        the work that changes tensors alone (a no_grad() per hook costs more than the count)."""
        release = self.release
        if release.accumulating:
            return
        if not reduced and id(p) in release.hooks.fed_by_ddp:
            return  # autograd's hook, before DDP's all-reduce: the comm hook hands it over
        if not release.in_progress:
            with torch.no_grad():
                self._begin_release_step(groups)
        if release.world > 1 and not reduced and id(p) not in release.reduced_by_fsdp and \
                id(p) in release.where and is_dtensor(p):
            release.check_reduced_by_fsdp(p)
        if not release.backward_end_queued:  # at its end, the buckets it left incomplete
            release.backward_end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: self._backward_ended(groups, state))
        bucket = release.arrived(p)
        if bucket is not None:
            with torch.no_grad():
                self._launch_bucket(bucket, groups, state)

    def _launch_bucket(self, bucket, groups, state) -> None:
        release = self.release
        if bucket.fast is not None and release.launch_fast(
                bucket, groups[bucket.group], state, self._release_inputs(groups, state),
                self.release_skips):
            return
        checked = release.check(bucket, state, self.backend, self.precision)
        self._launch_released(bucket, checked, groups, state)

    def _begin_release_step(self, groups) -> None:
        """At the step's first gradient, before anything changes: the loss is registered, the
        buckets are cut, and under several ranks every gradient arrives reduced."""
        release = self.release
        if release.in_progress:
            return
        if self.pending.total is None:
            raise RuntimeError(NO_LOSS)
        release.partition(groups)
        release.check_reduced(_world_size())
        release.in_progress = True

    def register_ddp(self, ddp_model, reduced, groups) -> None:
        """Feed gradient release from `ddp_model`'s all-reduce (ddp_release.py): its
        communication hook calls reduced(params, grads) for each DDP bucket. Checked first:
        nothing changes where it raises."""
        release = self.release
        if release is None:
            raise RuntimeError("register_ddp() needs AdamL(..., gradient_release=True)")
        if release.in_progress:
            raise RuntimeError("gradient release: register_ddp() during a step; call it before "
                               "the first backward, or after opt.step()")
        params = ddp_release.ddp_params(ddp_model)
        mine = {id(p) for group in groups for p in group["params"]}
        ddp_release.register(ddp_model, reduced)
        release.feed_from_ddp(p for p in params if id(p) in mine)

    @torch.no_grad()
    def ddp_bucket_reduced(self, params, grads, groups, state) -> None:
        """DDP's all-reduce of a bucket is done (AdamL's communication hook, ddp_release.py),
        `grads` the reduced gradients of `params`. Each of this optimizer's parameters arrives
        with its gradient; inside no_release(), and for parameters of no release, the reduced
        gradient is written into .grad, as DDP's own end of backward would."""
        release = self.release
        if not release.accumulating:
            self._begin_release_step(groups)
        for p, g in zip(params, grads):
            if release.accumulating or id(p) not in release.where or \
                    id(p) not in release.hooks.fed_by_ddp:
                write_back(p, g)
            else:
                if p.grad is None or p.grad.data_ptr() != g.data_ptr():
                    p.grad = g  # (gradient_as_bucket_view: .grad is that view already)
                self.grad_ready(p, groups, state, reduced=True)

    @torch.no_grad()
    def _backward_ended(self, groups, state) -> None:
        """Launch the buckets some of whose parameters got no gradient in this backward (as
        the ordinary step, those are not updated), so that no gradient outlives backward."""
        release = self.release
        release.backward_end_queued = False
        incomplete = [b for b in release.incomplete() if b.fast is None or not release.launch_fast(
            b, groups[b.group], state, self._release_inputs(groups, state), self.release_skips)]
        checked = [(b, release.check(b, state, self.backend, self.precision))
                   for b in incomplete]  # checked before any of them changes
        for bucket, bucket_checked in checked:
            self._launch_released(bucket, bucket_checked, groups, state)

    @torch.no_grad()
    def release_step(self, groups, state, loss, closure, grad_scale, found_inf):
        """step() under gradient release: launch the buckets still pending (their parameters
        that have a gradient), count the skip and end the step."""
        release = self.release
        if closure is not None or callable(loss):
            raise RuntimeError(
                "gradient release does not take a closure: the buckets step during backward; "
                "call opt.add_loss(loss), loss.backward(), opt.step()")
        if loss is not None:
            raise RuntimeError(
                "gradient release takes the loss before backward: call opt.add_loss(loss) "
                "before loss.backward(), then opt.step() without a loss")
        if grad_scale is not None or found_inf is not None:
            raise RuntimeError(
                "gradient release cannot be combined with torch.amp.GradScaler: found_inf is "
                "known only once every gradient exists, after the buckets stepped")
        release.partition(groups)
        pending = [(b, release.check(b, state, self.backend, self.precision))
                   for b in release.pending()]  # checked before anything changes
        with_grads = [(b, checked) for b, checked in pending if checked[0]]
        loss = self.pending.total
        if release.inputs is None:
            if not with_grads:  # no gradient anywhere: nothing to do, as the ordinary step
                self.drop_pending()
                return loss
            if loss is None:
                if _every_lr_is_zero(groups):  # (see general_step)
                    release.end_step()
                    result = self.general_step(groups, state, None, None, None)
                    self.invalidate()
                    return result
                raise RuntimeError(NO_LOSS)
        for bucket, checked in with_grads:
            self._launch_released(bucket, checked, groups, state)
        self._count_skip(release.inputs.take, groups)
        self.taken = release.inputs.take
        self.pending.take()
        release.end_step()
        return loss

    def _launch_released(self, bucket, checked, groups, state) -> None:
        """Launch a checked bucket (f_1 recorded first, if this step is the first taken)."""
        inputs = self._release_inputs(groups, state)
        losses.record_initial_loss(inputs.initial_loss, inputs.loss, inputs.take)
        self.release.launch(bucket, checked, groups[bucket.group], state, self.packed,
                            self.precision, inputs, lambda st: self.share_scalars(st, groups))

    def _release_inputs(self, groups, state) -> losses.StepInputs:
        """What every launch of this step reads (made at its first launch): the loss, the skip
        decision, f_1. The launches record f_1 (the fast one in its prologue)."""
        release = self.release
        if release.inputs is None:
            self._forget_scalars_of_a_reset_state(state)
            device = self.home_device(groups)
            if self.initial_loss is None:
                self.initial_loss = losses.new_initial_loss(device)
            if self.skipped is None:
                self.skipped = torch.zeros((), dtype=torch.float64, device=device)
            if self.release_skips is None or self.release_skips.device != device:
                self.release_skips = torch.zeros((), dtype=torch.float64, device=device)
            loss_t = self._release_loss(self.initial_loss.device)
            release.inputs = losses.StepInputs(loss_t, losses.decide_take(loss_t, None), None,
                                               self.initial_loss)
        return release.inputs

    def _release_loss(self, device: torch.device) -> torch.Tensor:
        """The loss of this release step, averaged as step_loss() does: by the all-reduce
        add_loss() started (waited on now: a stream dependency under NCCL), or by one now
        (losses registered only inside no_release())."""
        release = self.release
        total, in_flight = self.pending.total, release.loss_average
        release.loss_average = None
        process_group = losses.process_group(self.loss_group)
        if process_group is not None and in_flight is not None and in_flight[0] is total and \
                in_flight[1].total.device == device:
            return in_flight[1].result()
        return self.step_loss(total, process_group, device)

    # ----------------------------------------------------------------------------- plans

    def _changes(self, groups, state, actives) -> dict:
        """What each group's plan needs (checked; raises before anything changes): group index
        -> ("grads" or "all", its params, their grads, their backends)."""
        if state is not self.planned_state or state.version != self.planned_state_version:
            self.invalidate()  # a state entry set or deleted, or a new state dict
        if len(self.plans) != len(groups):
            self.plans = [None] * len(groups)
        changes = {}
        for gi, (params, grads) in enumerate(actives):
            plan = self.plans[gi]
            change = "all" if plan is None else plan.change(params, grads)
            if change == "grads" and not plan.new_grads_fit(grads, self.backend):
                change = "all"
            if change == "all":
                names = planning.check_group(params, grads, state, self.backend, self.precision)
                changes[gi] = (change, params, grads, names)
            elif change == "grads":
                changes[gi] = (change, params, grads, None)
        return changes

    def _apply(self, changes: dict, groups, state) -> None:
        self._forget_scalars_of_a_reset_state(state)
        for gi, (change, params, grads, names) in changes.items():
            if change == "grads":
                self.plans[gi].replace_grads(grads)
            else:
                self.plans[gi] = planning.make_group_plan(
                    params, grads, names, state, self.packed, self.precision,
                    _param_indices(groups), telemetry=self.telemetry is not None)
                for p in params:
                    self.share_scalars(state[p], groups)
        self.planned_state, self.planned_state_version = state, state.version

    def _forget_scalars_of_a_reset_state(self, state) -> None:
        """f_1 and the skip count belong to the state: once it holds them nowhere (emptied or
        replaced: opt.state.clear(), opt.state = defaultdict(dict)), they start afresh, as a
        new optimizer's, or after loading an empty state dict."""
        if self.planned_state is None and self.initial_loss is not None and not any(
                isinstance(st, dict) and "initial_loss" in st for st in state.values()):
            self.initial_loss = self.skipped = None

    def _release_grads(self) -> None:
        """After the launches: the plans keep no gradient alive (zero_grad(set_to_none=True)
        frees them); the next step points the tables at its own."""
        for plan in self.plans:
            if plan is not None:
                plan.release_grads()

    def describe(self, num_groups: int) -> list[list[dict]]:
        plans = self.plans + [None] * (num_groups - len(self.plans))
        return [[] if plan is None else plan.describe() for plan in plans[:num_groups]]

    # ----------------------------------------------------------------------------- scalars

    def home_device(self, groups) -> torch.device:
        """Where f_1, the skip decision and the skip count live: the first parameter's device."""
        if self.initial_loss is not None:
            return self.initial_loss.device
        for group in groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def share_scalars(self, st: dict, groups) -> None:
        """Put f_1 and the skip count into a parameter's state: the same tensors in every
        entry, so that they are saved wherever the state goes (DCP keeps only `state` and
        `param_groups`)."""
        if self.initial_loss is None:
            self.initial_loss = losses.new_initial_loss(self.home_device(groups))
        if self.skipped is None:
            self.skipped = torch.zeros((), dtype=torch.float64, device=self.home_device(groups))
        st["initial_loss"] = self.initial_loss
        st["skipped_steps"] = self.skipped

    def load_scalars(self, initial_loss, skipped) -> None:
        """f_1 and the skip count of a loaded checkpoint (None: not in it)."""
        self.initial_loss, self.skipped = initial_loss, skipped
        self.invalidate()

    def _count_skip(self, take: torch.Tensor | None, groups) -> None:
        if self.skipped is None:
            self.skipped = torch.zeros((), dtype=torch.float64, device=self.home_device(groups))
        if take is None:
            self.skipped += 1
        else:  # skipped += 1 - take, in place on the device
            self.skipped.sub_(losses.move(take, self.skipped.device)).add_(1)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _active(group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [p for p in group["params"] if p.grad is not None]
    return params, [p.grad for p in params]


def _param_indices(groups) -> dict[int, int]:
    """id(p) -> the parameter's index in the optimizer: its position across all param groups
    (the key of its entry in state_dict()["state"]), stochastic rounding's j."""
    return {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in groups))}


def _every_lr_is_zero(groups) -> bool:
    """Whether every group's lr is 0 (a tensor lr is read only if it is on the CPU)."""
    def zero(lr):
        if isinstance(lr, torch.Tensor):
            return lr.device.type == "cpu" and float(lr) == 0.0
        return lr == 0

    return all(zero(g["lr"]) for g in groups)
