"""Checks of parameters and gradients: what AdamL accepts, and what the fused kernels can walk;
and a DTensor parameter's shard of its state tensors (local, shard_of, like_shard_of)."""

from __future__ import annotations

import torch

from .buckets import is_dense


try:  # DTensor: FSDP2 and tensor-parallel parameters
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without torch.distributed
    DTensor = None


def is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels update: a DTensor's local shard (its own storage, the attribute
    FSDP2 itself uses; to_local() would make a new view at every call), else t itself."""
    return t._local_tensor if is_dtensor(t) else t


def like_shard_of(view: torch.Tensor, p: torch.Tensor, shape=None, stride=None) -> torch.Tensor:
    """`view`, a shard of a state tensor laid out with p's mesh and placements: for a DTensor
    p, the DTensor of global `shape` and `stride` (p's by default) whose local tensor is `view`
    (so that DCP can reshard it); else `view` itself."""
    if not is_dtensor(p):
        return view
    return type(p).from_local(view, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape if shape is None else torch.Size(shape),
                              stride=p.stride() if stride is None else stride)


def shard_of(value: torch.Tensor, p: torch.Tensor, shape=None) -> torch.Tensor:
    """The part that p's shard holds of a saved tensor laid out with p's mesh and placements,
    of global `shape` (p's by default): a DTensor's local tensor, redistributed to p's
    placements first if need be, or a slice of a whole (unsharded) tensor, e.g. from a
    one-process checkpoint."""
    if not is_dtensor(p):
        return local(value) if not is_dtensor(value) else value.full_tensor()
    if is_dtensor(value):
        if value.placements != p.placements or value.device_mesh != p.device_mesh:
            value = value.redistribute(p.device_mesh, p.placements)
        return local(value)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        p.shape if shape is None else torch.Size(shape), p.device_mesh, p.placements)
    return value[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def check_param(p: torch.Tensor, what: str = "parameter") -> None:
    if is_dtensor(p):
        partial = [pl for pl in p.placements if pl.is_partial()]
        if partial:
            raise ValueError(
                f"AdamL does not support DTensor {what}s with Partial placements ({p.placements})"
                ": a partial value is not the parameter itself; reduce it first (Shard and "
                "Replicate placements are supported)"
            )
        p = local(p)
    if p.is_complex():
        raise ValueError(f"AdamL does not support complex {what}s (got {p.dtype})")
    if not p.is_floating_point():
        raise ValueError(f"AdamL needs floating-point {what}s, got {p.dtype}")
    if p.layout != torch.strided:
        raise ValueError(f"AdamL does not support {p.layout} {what}s")


def grad_dtype_ok(p: torch.Tensor, g: torch.Tensor) -> bool:
    """A gradient has its parameter's dtype, or float32 for a float16/bfloat16 parameter
    ("main grads": every backend reads them, docs/low_precision.md)."""
    return g.dtype == p.dtype or (
        g.dtype == torch.float32 and p.dtype in (torch.float16, torch.bfloat16))


def check_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    if is_dtensor(p) or is_dtensor(g):
        if not (is_dtensor(p) and is_dtensor(g) and g.placements == p.placements
                and g.device_mesh == p.device_mesh):
            raise ValueError(
                "a DTensor parameter needs a DTensor gradient with the same mesh and placements "
                f"(param {getattr(p, 'placements', 'not a DTensor')}, grad "
                f"{getattr(g, 'placements', 'not a DTensor')})"
            )
        p, g = local(p), local(g)
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError("AdamL does not support sparse gradients; use a dense gradient")
    if g.shape != p.shape or g.device != p.device or (
            g.dtype is not p.dtype and not grad_dtype_ok(p, g)):
        raise ValueError(
            f"gradient does not match its parameter: grad {tuple(g.shape)} {g.dtype} on "
            f"{g.device}, param {tuple(p.shape)} {p.dtype} on {p.device} (a gradient must have "
            "its parameter's shape, device and dtype, or be float32 for a float16/bfloat16 "
            "parameter)"
        )


def same_layout(p: torch.Tensor, t: torch.Tensor) -> bool:
    """t's elements sit in memory in p's order (a dimension of size 1 has no stride that
    matters)."""
    return all(n == 1 or a == b for n, a, b in zip(p.shape, t.stride(), p.stride()))


def fits_fused_kernels(p: torch.Tensor, *others: torch.Tensor) -> bool:
    """The fused kernels walk each tensor as one flat array from its data pointer: p must be
    dense, and every other tensor laid out like it."""
    return is_dense(p) and all(same_layout(p, t) for t in others)


def check_kernel_layout(p: torch.Tensor, others: list[torch.Tensor], backend: str) -> None:
    if not fits_fused_kernels(p, *others):
        raise ValueError(
            f"backend {backend!r} needs each parameter, its gradient and its moments to be dense "
            f"with the same strides (param strides {p.stride()}, others "
            f"{[t.stride() for t in others]}); backend='auto' takes the reference path for such "
            "tensors, or use backend='reference'"
        )
