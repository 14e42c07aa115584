"""The optimizer's steady-state step, with no per-tensor work in Python.

After a step on the general path (optimizer.py, plan.py) has checked and planned everything, a
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

import torch

from . import _extension, loss as losses
from .buckets import Bucket, signed_seed
from .tensor_checks import is_dtensor

FALLBACK = object()  # "take the general path"

# csrc/adaml_update.h's ScalarType codes
_TYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CHANGED = 2


class FastPath:
    def __init__(self, groups, launches, tables, take, device):
        self.groups = groups  # (group["params"], its length, slots, layout record, rows)
        self.launches = launches  # (group index, the bucket's fixed launch arguments)
        self.tables = tables  # int64 [buckets, 2]: rows address, rows, for the prologue
        self.take = take
        self.device = device

    @staticmethod
    def build(opt) -> "FastPath | None":
        """The fast path for opt's current plans, or None where it does not apply."""
        if _extension.load_error is not None or opt._initial_loss is None:
            return None
        device = opt._initial_loss.device
        groups, launches = [], []
        for gi, (group, plan) in enumerate(zip(opt.param_groups, opt._plans)):
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
            groups.append((params, len(params), torch.tensor(slots, dtype=torch.int64),
                           _extension.C.layout_record(planned, grads),
                           [t.rows_host for t in tables], [t.rows for t in tables]))
        rows = [(spec[0].data_ptr(), spec[3]) for _, spec in launches]
        tables = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2).to(device)
        take = torch.zeros((), dtype=torch.float32, device=device)
        return FastPath(groups, launches, tables, take, device)

    def step(self, opt, loss):
        """One step, or FALLBACK (nothing changed) where the general path must take it."""
        if opt.state.version != opt._planned_state_version:
            return FALLBACK
        if loss is None:
            loss = opt._pending.total
        if isinstance(loss, torch.Tensor):
            if loss.device != self.device or loss.numel() != 1 or not loss.is_floating_point():
                return FALLBACK
        elif not isinstance(loss, (float, int)) or isinstance(loss, bool):
            return FALLBACK
        found_inf = getattr(opt, "found_inf", None)
        grad_scale = getattr(opt, "grad_scale", None)
        for t in (found_inf, grad_scale):
            if t is not None and t.device != self.device:
                return FALLBACK
        if found_inf is not None and found_inf.dtype != torch.float32:
            return FALLBACK
        groups = opt.param_groups
        if len(groups) != len(self.groups):
            return FALLBACK
        for group, (params, n, *_) in zip(groups, self.groups):
            lr = group["lr"]
            if group["params"] is not params or len(params) != n or (
                    isinstance(lr, torch.Tensor) and lr.device != self.device):
                return FALLBACK
        for params, _, slots, record, rows_hosts, rows in self.groups:
            if _extension.C.refresh_grads(params, slots, record, rows_hosts, rows) == _CHANGED:
                return FALLBACK
        for plan in opt._plans:
            plan.grad_ptrs = None  # the tables were repointed here: the general path re-reads
        opt._pending.take()
        loss_t = opt._step_loss(loss, losses.process_group(opt.loss_group), self.device)
        _extension.C.prologue(loss_t, found_inf, opt._initial_loss, opt._skipped, self.take,
                              self.tables, len(self.launches))
        for gi, spec in self.launches:
            _launch(spec, groups[gi], loss_t, self.take, grad_scale, opt._initial_loss)
        opt._taken = self.take
        return loss


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
