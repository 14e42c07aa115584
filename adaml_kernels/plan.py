"""The optimizer's plan: which parameters a step updates, in which buckets, through which backend,
with their state in flat buffers, and the test that tells when the plan no longer holds.

A plan is made per param group and kept while its parameters keep their storage, shape, strides,
dtype and device. New gradient tensors (every `zero_grad()` + `backward()`) only repoint the
gradient column of the pointer tables. Anything else (a parameter changed in place through
`p.data = ...`, a gradient for a parameter that had none, a gradient laid out unlike its
parameter) makes a new plan, and the state of the parameters that changed is laid out again to
fit them as they are now (pack_state; the others' stays in place). Everything a plan change
needs is checked before anything is changed.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass

import torch

from . import backends, quant8, quant8_dtensor, staging
from .buckets import Bucket, is_dense, moment_dtype
from .hyperparams import Hyperparams
from .loss import StepInputs
from .precision import MASTER_KEY, Precision
from .tensor_checks import (
    check_grad, check_kernel_layout, check_param, is_dtensor, like_shard_of, local, same_layout,
    shard_of,
)

# Each parameter's moments start on a 64-byte boundary of the flat buffer.
ALIGN_BYTES = 64
# The exp_avg_sq row does not start a power of two after the exp_avg row: with a large bucket
# the two streams would then map to the same cache sets (4K aliasing), which made the CPU step
# 25-35% slower at 64M parameters.
ROW_GAP_BYTES = 4096 + 64
DEFAULT_PRECISION = Precision()


def layout_key(p: torch.Tensor) -> tuple:
    """What must not change in a parameter (or gradient) for its plan, table and state layout to
    hold (of a DTensor: its local shard, whose address the kernels use)."""
    t = local(p)
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


@dataclass
class GroupPlan:
    """What one param group's step launches."""

    params: list[torch.Tensor]  # the parameters that have a gradient, in group order
    param_keys: list[tuple]
    grad_keys: list[tuple] | None  # None once the fast path has repointed the tables
    buckets: list[tuple[Bucket, str]]  # with the backend that runs each
    members: list[list[int]]  # per bucket, its parameters' indices in `params`

    def change(self, params, grads) -> str | None:
        """None if the plan holds for these tensors, "grads" if only gradients moved, else "all"."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return "all"
        if any(map(operator.ne, map(layout_key, params), self.param_keys)):
            return "all"
        if self.grad_keys is None:  # the fast path repointed the tables: check the gradients
            return "grads"
        try:
            # The plan keeps no gradient alive, so one at a planned address may be a new
            # tensor laid out otherwise: its whole layout must match (new_grads_fit checks
            # the others).
            same = list(map(layout_key, grads)) == self.grad_keys
        except RuntimeError:  # e.g. a sparse gradient has no data pointer: revalidate
            return "all"
        return None if same else "grads"

    def new_grads_fit(self, grads, requested: str) -> bool:
        """Check new gradients for the plan's parameters; False if they need a new plan (a
        gradient of another dtype than its bucket's, or, under backend="auto", one laid out
        unlike its parameter in a fused bucket, or like it in a bucket that took the reference
        path for its layout). Raises if unusable."""
        for (bucket, name), idx in zip(self.buckets, self.members):
            fused = backends.is_fused(name)
            dtype = bucket.grad_dtype
            for p, i in zip(bucket.params, idx):  # p: the local tensor
                g = grads[i]
                check_grad(self.params[i], g)
                g = local(g)
                if g.dtype is not dtype:
                    return False
                if not fused and requested == "auto" and \
                        backends.select_for_tensor(requested, p, g) != name:
                    return False  # back to its fused bucket
                if fused and not bucket.staged and g.stride() != p.stride() and \
                        not same_layout(p, g):
                    if requested == "auto":
                        return False
                    check_kernel_layout(p, [g], name)
        return True

    def grads_repointed(self) -> None:
        """The fast path pointed the tables at new gradients: the next change() checks them."""
        self.grad_keys = None

    def replace_grads(self, grads) -> None:
        """Gradients at new addresses (checked by new_grads_fit): the tables are repointed."""
        self.grad_keys = [layout_key(g) for g in grads]
        grads = [local(g) for g in grads]
        for (bucket, _), idx in zip(self.buckets, self.members):
            bucket.replace_grads([grads[i] for i in idx])

    def attach_grads(self, grads) -> None:
        """Hand the buckets this step's gradients (where change() found the tables point)."""
        grads = [local(g) for g in grads]
        for (bucket, _), idx in zip(self.buckets, self.members):
            bucket.attach_grads([grads[i] for i in idx])

    def release_grads(self) -> None:
        for bucket, _ in self.buckets:
            bucket.release_grads()

    def describe(self) -> list[dict]:
        return [
            dict(backend=name, device=str(b.device), dtype=str(b.dtype).removeprefix("torch."),
                 tensors=len(b.params), numel=sum(p.numel() for p in b.params),
                 grad_dtype=str(b.grad_dtype).removeprefix("torch."),
                 state_dtype=str(b.exp_avgs[0].dtype).removeprefix("torch."),
                 master_weights=b.master_params is not None,
                 stochastic_rounding=b.stochastic_rounding, staged=b.staged)
            for b, name in self.buckets
        ]


def check_group(params, grads, state, requested: str,
                low: Precision = DEFAULT_PRECISION) -> list[str]:
    """Check a group's parameters, gradients and existing state; return each one's backend."""
    names = []
    for p, g in zip(params, grads):
        check_param(p)
        check_grad(p, g)
        if low.stochastic_rounding and element_offset(p) is None:
            raise ValueError(
                f"stochastic rounding needs each rank's shard to be a contiguous block of the "
                f"whole parameter (e.g. Shard(0)); a DTensor with placements {p.placements} "
                "would round its elements by their positions in the shard, unlike one process"
            )
        if is_dtensor(p) and moment_dtype(p.dtype, low.state_dtype, p.numel()) == torch.uint8:
            quant8_dtensor.check_sharding(p)
        st = state.get(p)
        if st and "exp_avg" in st:
            for key in ("exp_avg", "exp_avg_sq", MASTER_KEY):
                if key in st and st[key].shape != p.shape:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} has state {key!r} of shape "
                        f"{tuple(st[key].shape)}: it was changed in place (p.data = ...) to "
                        "another shape after its state was made; reset its state "
                        "(del opt.state[p]) or load a matching state dict"
                    )
        name = backends.select_for_tensor(requested, local(p), local(g))
        if backends.is_fused(name) and not staging.needs_staging(local(p)):
            check_kernel_layout(local(p), [local(g)], name)
        names.append(name)
    return names


def make_group_plan(params, grads, names, state, packed: dict,
                    low: Precision = DEFAULT_PRECISION, index_of: dict | None = None, *,
                    telemetry: bool = False) -> GroupPlan:
    """The plan of a group's parameters that have gradients (checked by check_group). Lays out
    state where it does not fit (pack_state; `packed` is its record).

    `low` holds the low-precision options; `index_of` maps id(p) to the parameter's index in the
    optimizer (stochastic rounding's j; default: its position in `params`); with `telemetry`
    every bucket gets a telemetry buffer (telemetry.py).
    """
    by_bucket: dict[tuple, list[int]] = {}
    for i, (p, g, name) in enumerate(zip(params, grads, names)):
        staged = backends.is_fused(name) and staging.needs_staging(local(p))
        mdt = moment_dtype(p.dtype, low.state_dtype, p.numel())
        by_bucket.setdefault((p.device, p.dtype, g.dtype, mdt, name, staged), []).append(i)
    pack_state(state, packed, params, low)
    buckets, members = [], []
    for (_, dtype, _, mdt, name, staged), idx in by_bucket.items():
        views = [state[params[i]] for i in idx]
        bucket = Bucket(
            [local(params[i]) for i in idx],
            [local(grads[i]) for i in idx],
            *([local(st[key]) for st in views] for key in ("exp_avg", "exp_avg_sq", "step")),
            master_params=[local(st[MASTER_KEY]) for st in views]
            if low.has_master(dtype) else None,
            param_indices=idx if index_of is None else [index_of[id(params[i])] for i in idx],
            # (None, a shard that is no contiguous block: refused under stochastic rounding,
            # unused without it)
            element_offsets=[element_offset(params[i]) or 0 for i in idx],
            stochastic_rounding=low.stochastic_rounding,
            seed=low.seed,
            staged=staged,
            moment_scales=[local(st[key]) for key in quant8.SCALE_KEYS.values() for st in views]
            if mdt == torch.uint8 else None,
            telemetry=telemetry,
        )
        buckets.append((bucket, name))
        members.append(idx)
    return GroupPlan(list(params), [layout_key(p) for p in params],
                     [layout_key(g) for g in grads], buckets, members)


def element_offset(p: torch.Tensor) -> int | None:
    """The index, in the whole parameter, of the first element of the shard the kernels update
    (0 for a plain tensor); None if the shard is not one contiguous block of the whole."""
    if not is_dtensor(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape[1:]) != tuple(p.shape[1:]) or not p.is_contiguous():
        return None if math.prod(shape) else 0
    return offset[0] * math.prod(p.shape[1:]) if len(shape) else 0


def run(buckets, hp: Hyperparams, inputs: StepInputs, on_device: dict) -> None:
    """Advance the step counts and update every bucket with its backend. Nothing is validated.

    `on_device` caches `inputs` per device across the groups of one step.
    """
    for bucket, name in buckets:
        dev = bucket.device
        if dev not in on_device:
            on_device[dev] = inputs.on(dev)
        local = on_device[dev]
        bucket.advance_steps(local.take)
        if bucket.staged:
            staging.step(backends.step_function(name), bucket, hp, local)
        else:
            backends.step_function(name)(bucket, hp, local)


# ------------------------------------------------------------------------------ flat state

def moment_stride(p: torch.Tensor) -> tuple:
    """Moments have the parameter's strides, so that element i in memory belongs to the same
    logical element in all of them (channels_last weights, transposed views); a parameter that
    is not dense gets contiguous moments."""
    return p.stride() if is_dense(p) else torch.empty(p.shape, device="meta").stride()


def state_fits(p: torch.Tensor, st: dict | None, low: Precision = DEFAULT_PRECISION) -> bool:
    """Whether p's moments (and master weight, if it needs one) exist and are laid out for p as
    it is now."""
    if not st or "exp_avg" not in st:
        return False
    m = st["exp_avg"]
    if is_dtensor(p) != is_dtensor(m) or (is_dtensor(p) and not _same_spec(p, m)):
        return False
    mdt = moment_dtype(p.dtype, low.state_dtype, p.numel())
    sharded = is_dtensor(p)
    p, m = local(p), local(m)
    fits = (
        m.device == p.device and m.dtype == mdt
        and m.shape == p.shape and m.stride() == moment_stride(p)
    )
    if mdt == torch.uint8:
        fits = fits and all(is_dtensor(st.get(key)) == sharded and
                            quant8.scales_fit(local(st.get(key)), p)
                            for key in quant8.SCALE_KEYS.values())
    if not low.has_master(p.dtype):
        return fits and MASTER_KEY not in st
    x = st.get(MASTER_KEY)
    x = None if x is None else local(x)
    return fits and x is not None and x.device == p.device and x.dtype == torch.float32 and (
        x.shape == p.shape and x.stride() == moment_stride(p))


def _same_spec(a, b) -> bool:
    return (a.device_mesh == b.device_mesh and a.placements == b.placements
            and a.shape == b.shape)


def pack_state(state, packed: dict, active: list, low: Precision = DEFAULT_PRECISION) -> None:
    """Lay out in new flat buffers the state of those parameters of `active` whose state is not
    already in one, laid out as the parameter is now: a parameter with its first gradient,
    changed in place, reset, or loaded from a state dict. Only their state is copied (the
    transient memory is bounded by theirs); every other parameter's stays where it is.

    `packed` maps id(p) to a weak reference to the exp_avg that the last layout put into p's
    state: an entry replaced, emptied or loaded since no longer holds that very tensor.
    """
    misfits: dict[tuple, list] = {}
    for p in active:
        st = state.get(p)
        laid_out = packed.get(id(p))
        if laid_out is None or st is None or laid_out() is not st.get("exp_avg") or \
                not state_fits(p, st, low):
            mdt = moment_dtype(p.dtype, low.state_dtype, p.numel())
            misfits.setdefault((p.device, p.dtype, mdt), []).append(p)
    for members in misfits.values():
        pack(members, state, low)
        for p in members:
            packed[id(p)] = weakref.ref(state[p]["exp_avg"])


def _offsets(members, dtype: torch.dtype) -> tuple[list[int], int]:
    """Each member's offset in a flat buffer of `dtype` (64-byte aligned), and the total."""
    align = ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    offsets, total = [], 0
    for p in members:
        offsets.append(total)
        total += -(-local(p).numel() // align) * align
    return offsets, total


def pack(members: list[torch.Tensor], state, low: Precision = DEFAULT_PRECISION) -> None:
    """Lay the state of `members` out in flat buffers and make their state entries views of them.

    Existing values (from earlier steps, an earlier layout or a loaded checkpoint) are copied
    in element by element of the logical shape; new parameters start with zero moments and
    step 0, and a new master weight (fp16/bf16 parameters under master_weights) with the
    parameter's value. A master weight that is no longer needed is dropped.
    """
    device, dtype = members[0].device, members[0].dtype
    mdt = moment_dtype(dtype, low.state_dtype, members[0].numel())
    offsets, total = _offsets(members, mdt)
    # One buffer: every exp_avg, a gap, then every exp_avg_sq at the same offsets.
    second_row = total + ROW_GAP_BYTES // torch.empty((), dtype=mdt).element_size()
    buffer = torch.zeros(second_row + total, dtype=mdt, device=device)
    steps = torch.zeros(len(members), dtype=torch.float32, device=device)
    scales = quant8.ScaleBuffer([local(p) for p in members], device) if mdt == torch.uint8 \
        else None
    master = None
    if low.has_master(dtype):  # float32 master weights: a buffer of their own
        master_offsets, master_total = _offsets(members, torch.float32)
        master = torch.empty(master_total, dtype=torch.float32, device=device)
    for i, (p, off) in enumerate(zip(members, offsets)):
        st = state.laid_out_entry(p)
        shard = local(p)
        stride = moment_stride(shard)
        views = {
            "step": steps[i],
            "exp_avg": buffer.as_strided(shard.shape, stride, off),
            "exp_avg_sq": buffer.as_strided(shard.shape, stride, second_row + off),
        }
        if master is not None:
            views[MASTER_KEY] = master.as_strided(shard.shape, stride, master_offsets[i])
            if MASTER_KEY not in st:
                views[MASTER_KEY].copy_(shard.detach())
        else:
            st.pop(MASTER_KEY, None)
        if scales is not None:  # codes and block scales: copied, or encoded from values
            for name, key in quant8.SCALE_KEYS.items():
                codes, scale = views.pop(name), scales.view(name, i)
                source, source_scale = st.get(name), st.get(key)
                if source is not None:
                    source = shard_of(source, p)
                if source_scale is not None:
                    source_scale = quant8_dtensor.local_scales(source_scale, p)
                quant8.fill(codes, scale, source, source_scale, name)
                st[name] = like_shard_of(codes, p)
                st[key] = quant8_dtensor.scales_like_param(scale, p)
        else:  # 8-bit moments laid out in a float dtype: decoded, then copied below
            for name, key in quant8.SCALE_KEYS.items():
                if key in st:
                    st[name] = quant8_dtensor.decode_moment(st[name], st.pop(key), name)
        for name, view in views.items():
            if name in st:
                view.copy_(shard_of(st[name], p) if name != "step" else st[name])
            st[name] = view if name == "step" else like_shard_of(view, p)
