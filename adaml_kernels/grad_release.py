"""Gradient release: a step's buckets are updated during backward, each as soon as every gradient
of its parameters is complete, and those gradients are freed (docs/gradient_release.md).

    ReleaseHooks       one post-accumulate-grad hook per parameter, calling the optimizer back
    GradientRelease    the release buckets (each group's parameters, in reverse order, cut at
                       bucket_cap_mb of gradient), which gradients of this step arrived, and
                       each bucket's plan and steady-state launch

The step engine (engine.py) drives it: the hook of a bucket's last gradient launches that
bucket; step() launches the buckets still pending and ends the step. Every launch of a step
reads the same inputs (loss, take, f_1), settled once before the first launch, so each element's
update is the ordinary step's, bit for bit (SPEC.md, Gradient release).

Under torch.distributed a gradient must arrive reduced: FSDP2 calls the hooks of its sharded
parameters after their reduce-scatter; DDP's gradients arrive through AdamL's communication
hook (ddp_release.py), and their post-accumulate-grad hooks, which autograd calls before the
all-reduce, are ignored. Any other gradient under several ranks is refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import contextmanager
from itertools import chain

import torch

from . import plan as planning
from .fast_path import FastPath
from .hyperparams import Hyperparams
from .loss import StepInputs
from .precision import Precision
from .tensor_checks import is_dtensor, local

DEFAULT_BUCKET_CAP_MB = 25.0
MB = float(1 << 20)

UNREDUCED = (
    "gradient release under torch.distributed with {world} ranks: {what} gets its gradient "
    "before it is reduced across the ranks, and its bucket would step with it. Wrap the model "
    "in DistributedDataParallel and call opt.register_ddp(ddp_model), or shard it with FSDP2 "
    "(fully_shard), or use gradient_release=False"
)

NO_LOSS = (
    "gradient release steps each bucket during backward, so the loss must be known first: call "
    "opt.add_loss(loss) before loss.backward() (accumulation micro-batches: inside "
    "`with opt.no_release():`)"
)


def check_bucket_cap(bucket_cap_mb) -> float:
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or \
            not bucket_cap_mb > 0 or bucket_cap_mb == float("inf"):
        raise ValueError(
            f"Invalid bucket_cap_mb: {bucket_cap_mb!r} (must be a finite number > 0)")
    return float(bucket_cap_mb)


class ReleaseHooks:
    """The post-accumulate-grad hooks of one optimizer's parameters. `ready(p)` is called when
    p's gradient of a backward is complete; the hooks hold this object weakly."""

    def __init__(self, ready: Callable[[torch.Tensor], None]):
        self.ready = ready
        self.handles: dict[int, object] = {}  # id(p) -> its hook's handle
        # id(p) of the parameters whose reduced gradient DDP's communication hook hands over
        # (register_ddp): their hooks, which autograd calls before the all-reduce, are ignored
        self.fed_by_ddp: set[int] = set()

    def add(self, params) -> None:
        """Hook every parameter that requires a gradient (a frozen one is stepped by step())."""
        me = weakref.ref(self)

        def hook(p):
            hooks = me()
            if hooks is not None:
                hooks.ready(p)

        for p in params:
            if p.requires_grad and id(p) not in self.handles:
                self.handles[id(p)] = p.register_post_accumulate_grad_hook(hook)

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()


class ReleaseBucket:
    """Parameters of one group, device and dtype whose gradients are stepped together."""

    __slots__ = ("group", "params", "hooked", "arrived", "stepped", "plan", "fast")

    def __init__(self, group: int, params: list, hooked: int):
        self.group = group
        self.params = params
        self.hooked = hooked  # how many of them have a hook: the bucket is complete at that many
        self.arrived = 0
        self.stepped = False
        self.plan: planning.GroupPlan | None = None
        self.fast: FastPath | None = None


class GradientRelease:
    """The release buckets and the bookkeeping of the step in progress (see the module doc)."""

    def __init__(self, bucket_cap_mb: float, hooks: ReleaseHooks):
        self.bucket_cap_mb = bucket_cap_mb
        self.hooks = hooks
        self.buckets: list[ReleaseBucket] = []
        self.where: dict[int, int] = {}  # id(p) -> its bucket's index
        self.partitioned: list[tuple] = []  # per group: (group["params"], its length)
        self.index_of: dict[int, int] = {}
        self.accumulating = 0  # depth of no_release() contexts
        self.inputs: StepInputs | None = None  # settled at the step's first launch
        self.in_progress = False  # a gradient of this step arrived, step() not called yet
        self.backward_end_queued = False  # the end of the running backward is awaited
        self.seen: set[int] = set()  # id(p) of the gradients that arrived in this step
        # torch.distributed: the world size (settled at each step's first gradient), the
        # DTensor parameters seen to get their gradient from FSDP2 (after its reduce-scatter),
        # and the loss's all-reduce in flight: (the pending total it averages, LossAverage)
        self.world = 1
        self.unreduced: list = []  # (found by partition)
        self.reduced_by_fsdp: set[int] = set()
        self.loss_average: tuple | None = None
        self.forget_plans()

    # --------------------------------------------------------------------------- buckets

    def partition(self, groups) -> None:
        """Cut every group into release buckets, unless the groups are those last cut."""
        if len(groups) == len(self.partitioned) and all(
                g["params"] is ps and len(ps) == n for g, (ps, n) in zip(groups, self.partitioned)):
            return
        if self.in_progress:
            raise RuntimeError("gradient release: the param groups changed during a step")
        cap = self.bucket_cap_mb * MB
        buckets, where = [], {}
        for gi, group in enumerate(groups):
            open_buckets: dict[tuple, tuple[list, list]] = {}  # key -> (params, [bytes])
            for p in reversed(group["params"]):  # backward meets the last layers first
                # (a parameter without a hook, frozen when it was added, is stepped by step())
                key = (p.device, p.dtype, id(p) in self.hooks.handles)
                size = local(p).numel() * p.element_size()  # a DTensor's: its local shard
                members, filled = open_buckets.get(key, (None, None))
                if members is None or (members and filled[0] + size > cap):
                    members, filled = [], [0]
                    open_buckets[key] = (members, filled)
                    buckets.append(ReleaseBucket(gi, members, 0))
                members.append(p)
                filled[0] += size
        for bi, bucket in enumerate(buckets):
            bucket.hooked = sum(id(p) in self.hooks.handles for p in bucket.params)
            for p in bucket.params:
                where[id(p)] = bi
        self.buckets, self.where = buckets, where
        self.partitioned = [(g["params"], len(g["params"])) for g in groups]
        self.index_of = {id(p): i for i, p in enumerate(
            chain.from_iterable(g["params"] for g in groups))}
        # hooked plain tensors that no DDP reduces: under several ranks, autograd hands them
        # over unreduced (DTensor parameters are checked at their first gradient)
        self.unreduced = [p for g in groups for p in g["params"] if id(p) in self.hooks.handles
                          and not is_dtensor(p) and id(p) not in self.hooks.fed_by_ddp]

    def feed_from_ddp(self, params) -> None:
        """These parameters' reduced gradients come from DDP's communication hook; autograd's
        hook calls for them (before the all-reduce) are ignored."""
        self.hooks.fed_by_ddp.update(id(p) for p in params)
        self.partitioned = []  # cut again (and the unreduced parameters found again)

    def check_reduced(self, world: int) -> None:
        """At a step's first gradient, before anything changes: under several ranks, every
        hooked plain tensor must be fed by DDP."""
        self.world = world
        if world > 1 and self.unreduced:
            p = self.unreduced[0]
            raise RuntimeError(UNREDUCED.format(
                world=world, what=f"a parameter (index {self.index_of[id(p)]}, shape "
                f"{tuple(p.shape)}) that no DistributedDataParallel model registered with "
                "opt.register_ddp() reduces"))

    def check_reduced_by_fsdp(self, p) -> None:
        """A DTensor parameter's hook under several ranks: FSDP2 calls it after the
        reduce-scatter, from its own code; autograd calls it (tensor parallel, a DTensor
        outside FSDP2) from the parameter's AccumulateGrad node, before any data-parallel
        reduction: refused."""
        node = torch._C._current_autograd_node()
        if node is not None and type(node).__name__ == "AccumulateGrad" and \
                getattr(node, "variable", None) is p:
            raise RuntimeError(UNREDUCED.format(
                world=self.world, what=f"a DTensor parameter (index {self.index_of[id(p)]}, "
                f"placements {tuple(p.placements)}) outside FSDP2 (e.g. tensor parallel)"))
        self.reduced_by_fsdp.add(id(p))

    def forget_plans(self) -> None:
        """The next launch of each bucket plans anew (state reset, loaded, or precision)."""
        for bucket in getattr(self, "buckets", ()):
            bucket.plan = bucket.fast = None
        self.planned_state = None
        self.planned_state_version = -1

    def arrived(self, p) -> ReleaseBucket | None:
        """Count p's gradient; its bucket if that completes it, else None."""
        bi = self.where.get(id(p))
        if bi is None:
            return None  # not a parameter of this optimizer (any more)
        bucket = self.buckets[bi]
        if id(p) in self.seen or bucket.stepped:
            raise RuntimeError(
                "gradient release: a parameter got a second gradient in one step (two "
                "backward passes); run all but the last micro-batch inside "
                "`with opt.no_release():`, or call opt.step() between them")
        self.seen.add(id(p))
        bucket.arrived += 1
        return bucket if bucket.arrived == bucket.hooked else None

    def pending(self) -> list[ReleaseBucket]:
        return [b for b in self.buckets if not b.stepped]

    def incomplete(self) -> list[ReleaseBucket]:
        """The buckets some of whose gradients arrived in this step, not all."""
        return [b for b in self.buckets if b.arrived and not b.stepped]

    def end_step(self) -> None:
        for bucket in self.buckets:
            bucket.arrived, bucket.stepped = 0, False
        self.seen.clear()
        self.inputs = None
        self.in_progress = False
        self.backward_end_queued = False
        self.loss_average = None

    @contextmanager
    def no_release(self):
        self.accumulating += 1
        try:
            yield
        finally:
            self.accumulating -= 1

    # --------------------------------------------------------------------------- launches

    def check(self, bucket: ReleaseBucket, state, requested: str, low: Precision):
        """What launching `bucket` needs, checked (raises before anything changes): its
        parameters that have a gradient, their gradients, and the plan change (None, "grads",
        "all" with each one's backend)."""
        if state is not self.planned_state or state.version != self.planned_state_version:
            self.forget_plans()  # a state entry set or deleted, or a new state dict
        params = [p for p in bucket.params if p.grad is not None]
        grads = [p.grad for p in params]
        plan = bucket.plan
        change = "all" if plan is None else plan.change(params, grads)
        if change == "grads" and not plan.new_grads_fit(grads, requested):
            change = "all"
        names = planning.check_group(params, grads, state, requested, low) \
            if change == "all" and params else None
        return params, grads, change, names

    def launch(self, bucket: ReleaseBucket, checked, group: dict, state, packed: dict,
               low: Precision, inputs: StepInputs, share_scalars) -> None:
        """Plan `bucket` where `checked` says so, launch it and free its gradients.
        `share_scalars(st)` puts f_1 and the skip count into a new state entry."""
        params, grads, change, names = checked
        bucket.stepped = True
        bucket.fast = None  # its tables may be replaced: rebuilt after the launch
        if not params:
            return
        if change == "all":
            bucket.plan = planning.make_group_plan(params, grads, names, state, packed, low,
                                                   self.index_of)
            for p in params:
                share_scalars(state[p])
        elif change == "grads":
            bucket.plan.replace_grads(grads)
        self.planned_state, self.planned_state_version = state, state.version
        plan = bucket.plan
        plan.attach_grads(grads)
        try:
            planning.run(plan.buckets, Hyperparams.from_group(group), inputs, {})
            bucket.fast = FastPath.build([{"params": bucket.params}], [plan],
                                         inputs.loss.device)
        finally:
            plan.release_grads()
        for p in params:
            p.grad = None

    def launch_fast(self, bucket: ReleaseBucket, group: dict, state, inputs: StepInputs,
                    scratch: torch.Tensor) -> bool:
        """The steady-state launch (one C++ call: the gradients checked against the plan, the
        table repointed, the step counts advanced, the kernels run); False (nothing changed)
        where the checked launch must take it. `scratch` takes the call's skip count (the
        step's is counted once, in step())."""
        fast = bucket.fast
        if fast is None or state is not self.planned_state or \
                state.version != self.planned_state_version:
            return False
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device != fast.device:
            return False
        if not fast.run([group], inputs.loss, None, None, inputs.initial_loss, scratch,
                        refresh=True):
            return False
        bucket.plan.grads_repointed()
        bucket.stepped = True
        for p in bucket.params:
            p.grad = None
        return True
