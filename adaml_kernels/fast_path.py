"""The optimizer's steady-state step, with no per-tensor work in Python.

After a step on the general path (engine.py, plan.py) has checked and planned everything, a
FastPath holds, per param group, the plan in the form the C++ ops read (csrc/adaml_fast_path.cpp).
The next steps then cost one op call whatever the number of tensors and groups, fast_step_:

    refresh         every parameter and gradient checked against the plans in C++, the tables
                    pointed at the new gradients, the parameters' versions bumped (anything
                    unexpected: nothing changes, and the general path takes the step)
    prologue        the skip decision, f_1, the skip count and every step count
    launches        every bucket's kernel from its table

and then the state buffers' versions are bumped (one Python call, a few tensors).

Under loss averaging the refresh is its own op, refresh_grads_, called before the loss's
all-reduce (every rank must join the all-reduce; a rank whose step falls back to the general
path joins it there), and fast_step_ does the rest.

It applies only where those calls can do everything the general path would: the "cpu" and
"cuda" backends, plain (not DTensor) parameters, none staged (staging.py), one device, and a
loss, lr, grad scale and found_inf already on that device. Anything else takes the general path.
"""

from __future__ import annotations

import torch

from . import _extension
from .hyperparams import group_launch_values
from .layout import DTYPE_CODES
from .tensor_checks import is_dtensor

FALLBACK = object()  # "take the general path"

_CHANGED = 2  # refresh_grads_: something other than the gradients changed


class FastPath:
    """The steady-state form of a step's plans (engine.py builds it after a general step)."""

    def __init__(self, groups, check_args, launch_args, take, device, state_buffers=()):
        # per group: group["params"] and the parameters it held (kept alive: the layout record
        # names each one's TensorImpl, so that another object in its place is seen)
        self.groups = groups
        self.check_args = check_args  # what the gradients' check compares: slots, layout record
        self.launch_args = launch_args  # rows, host rows, chunk maps, configs, bucket groups,
        # the prologue's table, and the buckets' telemetry buffers (none without telemetry)
        self.take = take
        self.device = device
        # one tensor per flat buffer the launches write through the tables (moments, master
        # weights, step counts): views share their buffer's version counter, so bumping these
        # bumps every state tensor's, as torch's fused ops bump what they write
        self.state_buffers = list(state_buffers)
        self.status = torch.zeros(1, dtype=torch.int64)  # refresh_grads_'s answer
        empty = torch.zeros(0, dtype=torch.int64)
        self.no_check_args = (empty, empty)  # fast_step_ after refresh_grads_
        self.status_value = self.status.numpy()  # read without a torch call

    @staticmethod
    def build(param_groups, plans, device: torch.device) -> "FastPath | None":
        """The fast path for these plans, or None where it does not apply. `device` is where
        f_1 and the skip count live."""
        if _extension.load_error is not None or len(plans) != len(param_groups):
            return None
        groups, slots, planned, buckets, bucket_groups = [], [], [], [], []
        for gi, (group, plan) in enumerate(zip(param_groups, plans)):
            params = group["params"]
            if plan is None or any(is_dtensor(p) for p in params):
                return None
            where = {}
            for (bucket, name), idx in zip(plan.buckets, plan.members):
                if name not in ("cpu", "cuda") or bucket.device != device or bucket.staged:
                    return None
                for row, i in enumerate(idx):
                    where[id(plan.params[i])] = (len(buckets) << 32) | row
                buckets.append(bucket)
                bucket_groups.append(gi)
            for p in params:
                slot = where.get(id(p), -1)
                slots.append(slot)
                if slot >= 0:
                    planned.append(p)
            groups.append((params, tuple(params)))
        tables = [bucket.table() for bucket in buckets]
        rows, rows_hosts = [t.rows for t in tables], [t.rows_host for t in tables]
        record = torch.ops.adaml_kernels.layout_record(planned, [p.grad for p in planned])
        check_args = (torch.tensor(slots, dtype=torch.int64), record)
        # The prologue's list of tables: each one's rows (on the device) and row count.
        counts = [(r.data_ptr(), r.shape[0]) for r in rows]
        prologue_tables = torch.tensor(counts, dtype=torch.int64).reshape(-1, 2).to(device)
        launch_args = (rows, rows_hosts, [t.chunk_tensor for t in tables],
                       [value for bucket in buckets for value in bucket.config], bucket_groups,
                       prologue_tables,
                       [b.telemetry for b in buckets if b.telemetry is not None])
        take = torch.zeros((), dtype=torch.float32, device=device)
        return FastPath(groups, check_args, launch_args, take, device, _state_buffers(buckets))

    def accepts(self, param_groups, loss, grad_scale, found_inf) -> bool:
        """Whether this step's inputs are what the fast path can take (else: the general path)."""
        if isinstance(loss, torch.Tensor):
            if loss.device != self.device or loss.numel() != 1 or \
                    not loss.dtype.is_floating_point or loss.dtype not in DTYPE_CODES:
                return False  # (e.g. float8: the general path raises)
        elif not isinstance(loss, (float, int)) or isinstance(loss, bool):
            return False
        for t in (found_inf, grad_scale):
            if t is not None and t.device != self.device:
                return False
        if found_inf is not None and found_inf.dtype != torch.float32:
            return False
        if len(param_groups) != len(self.groups):
            return False
        for group, (params, held) in zip(param_groups, self.groups):
            lr = group["lr"]
            if group["params"] is not params or len(params) != len(held) or (
                    isinstance(lr, torch.Tensor) and lr.device != self.device):
                return False
        return True

    def refresh_grads(self) -> bool:
        """Check every parameter and gradient against the plans (in C++) and point the tables
        at the new gradients; False if anything else changed (the general path re-plans)."""
        rows, rows_hosts = self.launch_args[:2]
        torch.ops.adaml_kernels.refresh_grads_.default(self._params(), *self.check_args,
                                                       rows_hosts, rows, self.status)
        return self.status_value[0] != _CHANGED

    def run(self, param_groups, loss_t, grad_scale, found_inf, initial_loss, skipped,
            refresh: bool) -> bool:
        """The step: with `refresh`, refresh_grads first (in the same call); then the prologue
        (take, f_1, skip count, step counts) and every bucket's launch. False (nothing done)
        if the refresh found anything but new gradients."""
        hypers, lr_tensors = [], []
        for group in param_groups:  # hyperparameters may change between steps
            lr = group["lr"]
            lr_tensors.append(lr.reshape(()) if isinstance(lr, torch.Tensor) else None)
            hypers.extend(group_launch_values(group))
        slots, record = self.check_args if refresh else self.no_check_args
        rows, rows_hosts, chunks, configs, bucket_groups, tables, telemetry = self.launch_args
        torch.ops.adaml_kernels.fast_step_.default(
            self._params() if refresh else [], slots, record, self.status, rows, rows_hosts,
            chunks, configs, bucket_groups, hypers, lr_tensors, loss_t, found_inf, grad_scale,
            initial_loss, skipped, self.take, tables, telemetry)
        if self.status_value[0] == _CHANGED:
            return False
        torch.autograd.graph.increment_version(self.state_buffers)
        return True

    def _params(self) -> list:
        groups = self.groups
        return groups[0][0] if len(groups) == 1 else [p for ps, _ in groups for p in ps]


def _state_buffers(buckets) -> list[torch.Tensor]:
    """One state tensor per storage that the buckets' moments (and 8-bit moments' scales),
    master weights and step counts live in."""
    found = {}
    for bucket in buckets:
        for tensors in (bucket.exp_avgs, bucket.exp_avg_sqs, bucket.master_params or (),
                        bucket.moment_scales or (), bucket.steps):
            for t in tensors:
                found.setdefault(t.untyped_storage().data_ptr(), t)
    return list(found.values())
