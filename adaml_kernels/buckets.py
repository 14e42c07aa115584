"""Buckets: the tensors that one kernel launch updates, and the table the kernels read them from.

A bucket holds parameters of one device and one dtype (and gradients of one dtype, moments of
one dtype). The fused kernels do not take the tensors as arguments; they read a per-bucket table
with one 96-byte row per tensor (layout.Column names the columns):

    column  0: param address        5: master weight address (float32; 0: no master weights)
            1: grad address         6: numel
            2: exp_avg address      7: index of the tensor's first chunk
            3: exp_avg_sq address   8: the parameter's index in the optimizer (stochastic rounding)
            4: step address         9: index of the tensor's first element in the whole parameter
               (float32, 0-dim)        (0 unless the tensor is a shard of a larger parameter)
           10, 11: 8-bit moments: the addresses of exp_avg's and exp_avg_sq's block scales
               (float32, one per QUANT_BLOCK elements; 0: the moments are not 8-bit)

Work is split into chunks of CHUNK elements (at least one per tensor, so that every tensor has
a row in the chunk map), one program (Triton), block (CUDA) or loop iteration (CPU) per chunk;
`chunk_tensor[c]` names the tensor that chunk c belongs to, and the chunk starts at element
`(c - row[7]) * CHUNK` of that tensor. All offsets are 64-bit.

The table holds raw addresses, so a bucket keeps references to every tensor it points at, but
for the gradients: those it holds only while a step uses them (attach_grads .. release_grads),
so that zero_grad(set_to_none=True) frees them. The optimizer's plan (plan.py) rebuilds the
table whenever a tensor moves or changes shape or layout, and points it at every step's
gradients before the launch.
Tables reach the device with non-blocking copies, so building one never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import (ADDRESS_COLUMNS, CHUNK, DTYPE_CODES, FIGURES, MIN_8BIT_NUMEL,
                     TABLE_COLUMNS, VECTOR_BYTES, Column, Config, signed_seed)


def moment_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype | None = None,
                 numel: int | None = None) -> torch.dtype:
    """The moments' dtype: `state_dtype` (float32 if None) whatever the parameter dtype, except
    float64 for float64 params, and float32 for 8-bit moments (uint8) of a tensor of fewer
    than MIN_8BIT_NUMEL elements (`numel`: the tensor's; of a DTensor, the whole parameter's, so
    that every rank decides alike)."""
    if param_dtype == torch.float64:
        return torch.float64
    if state_dtype == torch.uint8 and numel is not None and numel < MIN_8BIT_NUMEL:
        return torch.float32
    return torch.float32 if state_dtype is None else state_dtype


def telemetry_dtype(device: torch.device) -> torch.dtype:
    """The dtype of telemetry buffers and figures: float64, except where a device has none."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def is_dense(t: torch.Tensor) -> bool:
    """True if the elements of t fill a contiguous block of memory in some dimension order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass
class PointerTable:
    rows: torch.Tensor  # int64 [T, TABLE_COLUMNS], on the bucket's device
    rows_host: torch.Tensor  # the same rows on the CPU, to check them against the tensors
    chunk_tensor: torch.Tensor  # int32 [num_chunks], on the bucket's device
    num_chunks: int
    aligned: bool  # every param/grad/moment/master address is VECTOR_BYTES-aligned
    aligned_but_grads: bool = True  # the same, the grad column left out (it changes alone)


class Bucket:
    """Parameters, gradients and state of one device and dtype, updated in one launch.

    `steps` is a list of 0-dim float32 tensors. When they are consecutive elements of one buffer
    (as the optimizer lays them out), the step count is advanced with a single add on that
    buffer. f_1 is not part of a bucket: it is one value per optimizer, handed to each launch.

    Low precision (docs/low_precision.md): `master_params` are float32 master weights of
    fp16/bf16 parameters (None: none); with `stochastic_rounding`, values stored as bf16 are
    rounded with bits hashed from (`seed`, step count, `param_indices[i]`, element index, the
    index counted from `element_offsets[i]`). Indices default to 0, 1, 2, ..., offsets to 0.
    With 8-bit moments (uint8 exp_avgs and exp_avg_sqs, quant8.py), `moment_scales` holds each
    tensor's exp_avg block scales, then each tensor's exp_avg_sq block scales.

    A `staged` bucket holds parameters that are not dense; a fused backend updates them through
    dense copies (staging.py), never through this bucket's own table.

    With `telemetry`, `self.telemetry` is the buffer its launches write their figures to
    (telemetry.py): float64 [chunks, layout.FIGURES], zeros until a launch, summed over its rows.
    """

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, steps, *, master_params=None,
                 param_indices=None, element_offsets=None, stochastic_rounding: bool = False,
                 seed: int = 0, staged: bool = False, moment_scales=None,
                 telemetry: bool = False):
        self.params = list(params)
        self.staged = staged  # updated through dense copies (staging.py)
        self.grads: list[torch.Tensor] | None = list(grads)  # None: released
        self.grad_dtype = self.grads[0].dtype  # kept when the gradients are released
        self.exp_avgs = list(exp_avgs)
        self.exp_avg_sqs = list(exp_avg_sqs)
        self.steps = list(steps)
        self.master_params = None if master_params is None else list(master_params)
        self.moment_scales = None if moment_scales is None else list(moment_scales)
        n = len(self.params)
        self.param_indices = list(range(n)) if param_indices is None else list(param_indices)
        self.element_offsets = [0] * n if element_offsets is None else list(element_offsets)
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.flat_steps = _as_one_buffer(self.steps)
        self.numel = sum(p.numel() for p in self.params)
        self.telemetry: torch.Tensor | None = None
        if telemetry:
            chunks = sum(max(1, -(-p.numel() // CHUNK)) for p in self.params)
            self.telemetry = torch.zeros((chunks, FIGURES), dtype=telemetry_dtype(self.device),
                                         device=self.device)
        self._table: PointerTable | None = None
        # The launch values that hold as long as the bucket (layout.Config).
        self.config = Config(
            DTYPE_CODES[self.dtype], DTYPE_CODES[self.grads[0].dtype],
            DTYPE_CODES[self.exp_avgs[0].dtype], int(self.master_params is not None),
            int(stochastic_rounding), signed_seed(seed))

    def replace_grads(self, grads) -> None:
        """New gradient tensors for the same parameters: only the table's grad column changes.

        (Gradients set to None and recomputed usually land at new addresses on the CPU.)
        """
        self.grads = list(grads)
        if self._table is not None:
            rows_host = self._table.rows_host.clone()
            ptrs = [g.data_ptr() for g in self.grads]
            rows_host[:, Column.GRAD] = torch.tensor(ptrs, dtype=torch.int64)
            self._table = PointerTable(
                rows=_to_device(rows_host, self.device),
                rows_host=rows_host,
                chunk_tensor=self._table.chunk_tensor,
                num_chunks=self._table.num_chunks,
                aligned=self._table.aligned_but_grads and _all_aligned(ptrs, rows_host[:, Column.GRAD]),
                aligned_but_grads=self._table.aligned_but_grads,
            )

    def attach_grads(self, grads) -> None:
        """The gradients of this launch, at the addresses the table already holds."""
        self.grads = list(grads)

    def release_grads(self) -> None:
        """Drop the gradients after the launch (the table keeps their addresses only)."""
        self.grads = None

    def advance_steps(self, take: torch.Tensor) -> None:
        """step += take (take is 1.0 for a step taken, 0.0 for a skipped one), on the device."""
        if self.flat_steps is not None:
            self.flat_steps.add_(take)
        else:
            torch._foreach_add_(self.steps, take)

    def table(self) -> PointerTable:
        if self._table is None:
            self._table = build_table(
                self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps,
                self.master_params, self.param_indices, self.element_offsets,
                self.moment_scales,
            )
        return self._table

    def fused_op_args(self, hp, inputs) -> tuple:
        """Arguments of the fused ops (C++/CUDA fused_step_, Triton triton_step_), in their
        schema's order:

        (params!, grads, exp_avgs!, exp_avg_sqs!, steps, master_params!, moment_scales!, rows,
         rows_host, chunk_tensor, hyper, config, loss, take, lr_tensor?, grad_scale?,
         initial_loss?, telemetry!?)

        `hyper` and `config` are layout.Hyper and layout.Config; `master_params` is [] without
        master weights, `moment_scales` [] without 8-bit moments, `telemetry` None without it. `inputs` (loss.StepInputs) are
        on the bucket's device; the launch only reads them.
        """
        table = self.table()
        lr_tensor = None
        if isinstance(hp.lr, torch.Tensor):
            lr_tensor = _to_device(hp.lr.reshape(()), self.device)
        return (
            self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.steps,
            self.master_params or [], self.moment_scales or [], table.rows, table.rows_host,
            table.chunk_tensor, hp.launch_values(), self.config, inputs.loss, inputs.take, lr_tensor,
            inputs.grad_scale, inputs.initial_loss if hp.normalize_loss else None,
            self.telemetry,
        )


def _as_one_buffer(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-d tensor whose elements are exactly `tensors`, in order, if there is one."""
    first = tensors[0]
    if any(t.dim() != 0 for t in tensors):
        return None
    size = first.element_size()
    if not all(
        t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.data_ptr() == first.data_ptr() + i * size
        and t.dtype == first.dtype
        for i, t in enumerate(tensors)
    ):
        return None
    return first.as_strided((len(tensors),), (1,))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: a copy from pageable host
    memory is staged by the CUDA driver before the call returns, so the source may change
    afterwards."""
    return t.to(device, non_blocking=True)


def build_table(params, grads, exp_avgs, exp_avg_sqs, steps, master_params=None,
                param_indices=None, element_offsets=None, moment_scales=None) -> PointerTable:
    """The pointer table of these tensors (`moment_scales`: see Bucket)."""
    n_tensors = len(params)
    rows = []
    chunk_counts = []
    first_chunk = 0
    for i, p in enumerate(params):
        addresses = [p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                     exp_avg_sqs[i].data_ptr(), steps[i].data_ptr(),
                     0 if master_params is None else master_params[i].data_ptr()]
        n = p.numel()
        chunks = max(1, -(-n // CHUNK))
        index = i if param_indices is None else param_indices[i]
        offset = 0 if element_offsets is None else element_offsets[i]
        scales = [0, 0] if not moment_scales else [
            moment_scales[i].data_ptr(), moment_scales[n_tensors + i].data_ptr()]
        rows.append(addresses + [n, first_chunk, index, offset] + scales)
        chunk_counts.append(chunks)
        first_chunk += chunks
    rows_t = torch.tensor(rows, dtype=torch.int64).reshape(-1, TABLE_COLUMNS)
    chunk_tensor = torch.repeat_interleave(
        torch.arange(len(rows), dtype=torch.int32), torch.tensor(chunk_counts, dtype=torch.int64)
    )
    device = params[0].device if params else torch.device("cpu")
    but_grads = rows_aligned(rows_t.index_fill(1, torch.tensor([int(Column.GRAD)]), 0))
    return PointerTable(
        rows=_to_device(rows_t, device),
        rows_host=rows_t,
        chunk_tensor=_to_device(chunk_tensor, device),
        num_chunks=first_chunk,
        aligned=but_grads and bool((rows_t[:, Column.GRAD] % VECTOR_BYTES == 0).all()),
        aligned_but_grads=but_grads,
    )


def _all_aligned(ptrs: list[int], column: torch.Tensor) -> bool:
    """Whether every address is VECTOR_BYTES-aligned (in Python for a few, else in torch)."""
    if len(ptrs) <= 256:
        return all(p % VECTOR_BYTES == 0 for p in ptrs)
    return bool((column % VECTOR_BYTES == 0).all())


def rows_aligned(rows_host: torch.Tensor) -> bool:
    """Whether every param, grad, moment and master address in the table is VECTOR_BYTES-aligned
    (a missing master weight has address 0)."""
    if rows_host.shape[0] == 0:
        return True
    worst = (rows_host[:, :Column.MASTER + 1] % VECTOR_BYTES).amax(0).tolist()
    return not any(worst[c] for c in ADDRESS_COLUMNS)


def table_matches(rows_host: torch.Tensor, params, grads, exp_avgs, exp_avg_sqs, steps,
                  master_params=None, moment_scales=None) -> bool:
    """Whether `rows_host` points at exactly these tensors.

    A fused op is handed the cached table together with the tensors it updates. Under
    torch.compile's functionalization the tensors may be copies; the op then builds a table
    for the copies instead of writing through stale addresses.
    """
    if rows_host.shape[0] != len(params):
        return False
    n = len(params)
    masters = master_params or [None] * n
    scales = [(0, 0)] * n if not moment_scales else [
        (moment_scales[i].data_ptr(), moment_scales[n + i].data_ptr()) for i in range(n)]
    expected = rows_host[:, :Column.NUMEL + 1].tolist()
    scale_columns = rows_host[:, Column.EXP_AVG_SCALE:Column.EXP_AVG_SQ_SCALE + 1].tolist()
    return all(
        row == [p.data_ptr(), g.data_ptr(), m.data_ptr(), w.data_ptr(), s.data_ptr(),
                0 if x is None else x.data_ptr(), p.numel()] and tuple(sc) == ms
        for row, sc, p, g, m, w, s, x, ms in zip(expected, scale_columns, params, grads, exp_avgs,
                                                 exp_avg_sqs, steps, masters, scales)
    )
