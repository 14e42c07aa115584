"""Checks of parameters and gradients: what AdamL accepts, and what the fused kernels can walk."""

from __future__ import annotations

import torch

from .buckets import is_dense


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def check_param(p: torch.Tensor, what: str = "parameter") -> None:
    if is_dtensor(p):
        raise ValueError(
            f"AdamL does not support DTensor {what}s yet (FSDP2, tensor parallel): its kernels "
            "update local storage through a pointer table. FSDP with flat parameters and DDP work"
        )
    if p.is_complex():
        raise ValueError(f"AdamL does not support complex {what}s (got {p.dtype})")
    if not p.is_floating_point():
        raise ValueError(f"AdamL needs floating-point {what}s, got {p.dtype}")
    if p.layout != torch.strided:
        raise ValueError(f"AdamL does not support {p.layout} {what}s")


def grad_dtype_ok(p: torch.Tensor, g: torch.Tensor) -> bool:
    """A gradient has its parameter's dtype, or float32 for a float16/bfloat16 parameter
    ("main grads": every backend reads them, README "Low precision")."""
    return g.dtype == p.dtype or (
        g.dtype == torch.float32 and p.dtype in (torch.float16, torch.bfloat16))


def check_grad(p: torch.Tensor, g: torch.Tensor) -> None:
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
