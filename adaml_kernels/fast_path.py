"""The optimizer's steady-state step, with no per-tensor work in Python.

After a step on the general path (engine.py, plan.py) has checked and planned everything, a
FastPath holds, per param group, the plan in the form the C++ side reads (adaml_fast.cpp). The
next steps then cost a few calls whatever the number of tensors:

    refresh_grads  per group: every parameter and gradient checked against the plan in C++, the
                   tables pointed at the new gradients (anything unexpected: the general path)
    prologue       once: the skip decision, f_1, the skip count and every step count
    launch         per bucket: the kernel, from its table

It applies only where those calls can do everything the general path would: the "cpu" and
"cuda" backends, plain (not DTensor) parameters, one device, and a loss, lr, grad scale and
found_inf already on that device. Anything else takes the general path.
"""

from __future__ import annotations

import operator

import torch

from . import _extension
from .buckets import Bucket, signed_seed
from .tensor_checks import is_dtensor

FALLBACK = object()  # "take the general path"

# csrc/adaml_update.h's ScalarType codes
_TYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CHANGED = 2


class FastPath:
    """The steady-state form of a step's plans (engine.py builds it after a general step)."""

    def __init__(self, groups, launches, tables, take, device):
        # (group["params"], the parameters it held, slots, layout record, rows)
        self.groups = groups
        self.launches = launches  # (group index, the bucket's fixed launch arguments)
        self.tables = tables  # int64 [buckets, 2]: rows address, rows, for the prologue
        self.take = take
        self.device = device

    @staticmethod
    def build(param_groups, plans, device: torch.device) -> "FastPath | None":
        """The fast path for these plans, or None where it does not apply. `device` is where
        f_1 and the skip count live."""
        if _extension.load_error is not None or len(plans) != len(param_groups):
            return None
        groups, launches = [], []
        for gi, (group, plan) in enumerate(zip(param_groups, plans)):
            params = group["params"]
            if plan is None or any(is_dtensor(p) for p in params):
                return None
            where = {}
            for b, ((bucket, name), idx) in enumerate(zip(plan.buckets, plan.members)):
                if name not in ("cpu", "cuda") or bucket.device != device:
                    return None
                launches.append((gi, _launch_spec(bucket)))
                for row, i in enumerate(idx):
                    where[id(plan.params[i])] = (len(launches) - 1, b, row)
            slots = [-1] * len(params)
            planned = []
            for i, p in enumerate(params):
                if id(p) in where:
                    _, b, row = where[id(p)]
                    slots[i] = (b << 32) | row
                    planned.append(p)
            grads = [p.grad for p in planned]
            tables = [bucket.table() for bucket, _ in plan.buckets]
            groups.append((params, tuple(params), torch.tensor(slots, dtype=torch.int64),
                           _extension.C.layout_record(planned, grads),
                           [t.rows_host for t in tables], [t.rows for t in tables]))
        rows = [(spec[0].data_ptr(), spec[3]) for _, spec in launches]
        tables = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2).to(device)
        take = torch.zeros((), dtype=torch.float32, device=device)
        return FastPath(groups, launches, tables, take, device)

    def accepts(self, param_groups, loss, grad_scale, found_inf) -> bool:
        """Whether this step's inputs are what the fast path can take (else: the general path)."""
        if isinstance(loss, torch.Tensor):
            if loss.device != self.device or loss.numel() != 1 or loss.dtype not in _TYPE_CODE:
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
        for group, (params, planned, *_) in zip(param_groups, self.groups):
            lr = group["lr"]
            if group["params"] is not params or len(params) != len(planned) or (
                    isinstance(lr, torch.Tensor) and lr.device != self.device):
                return False
            # A parameter replaced in the list by another object (even over the same storage,
            # which the C++ check cannot tell apart) has state of its own.
            if any(map(operator.is_not, params, planned)):
                return False
        return True

    def refresh_grads(self) -> bool:
        """Check every parameter and gradient against the plans (in C++) and point the tables
        at the new gradients; False if anything else changed (the general path re-plans)."""
        for params, _, slots, record, rows_hosts, rows in self.groups:
            if _extension.C.refresh_grads(params, slots, record, rows_hosts, rows) == _CHANGED:
                return False
        return True

    def run(self, param_groups, loss_t, grad_scale, found_inf, initial_loss, skipped):
        """The prologue (take, f_1, skip count, step counts) and every bucket's launch;
        returns `take`."""
        _extension.C.prologue(loss_t, found_inf, initial_loss, skipped, self.take,
                              self.tables, len(self.launches))
        for gi, spec in self.launches:
            _launch(spec, param_groups[gi], loss_t, self.take, grad_scale, initial_loss)
        return self.take


def _launch_spec(bucket: Bucket) -> tuple:
    """What a bucket's launch passes that holds as long as its plan: table (rows, host rows,
    chunk map), tensor count, dtype codes and master flag, stochastic rounding and seed. The
    fast path repoints the gradients inside the same host rows, so the table stays valid."""
    table = bucket.table()
    types = (_TYPE_CODE[bucket.dtype], _TYPE_CODE[bucket.grads[0].dtype],
             _TYPE_CODE[bucket.exp_avgs[0].dtype], int(bucket.master_params is not None))
    return (table.rows, table.rows_host, table.chunk_tensor, len(bucket.params), types,
            bucket.stochastic_rounding, signed_seed(bucket.seed))


def _launch(spec: tuple, group: dict, loss, take, grad_scale, initial_loss) -> None:
    rows, rows_host, chunk_tensor, n, types, stochastic_rounding, seed = spec
    lr = group["lr"]
    lr_tensor = lr.reshape(()) if isinstance(lr, torch.Tensor) else None
    beta1, beta2 = group["betas"]
    _extension.C.launch(
        rows, rows_host, chunk_tensor, n, types, loss, take,
        lr_tensor, grad_scale, initial_loss if group["normalize_loss"] else None,
        0.0 if lr_tensor is not None else float(lr), beta1, beta2, group["eps"], group["gamma"],
        group["phi"], group["loss_offset"], group["weight_decay"], group["normalize_loss"],
        group["decoupled_weight_decay"], group["maximize"], stochastic_rounding, seed,
    )
