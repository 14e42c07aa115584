"""Loader for the compiled extension adaml_kernels._C (C++ CPU and CUDA kernels).

Importing this module never raises: if the extension is missing or broken, `load_error` says
why and the backends "cpu" and "cuda" report it (backends.unavailable_reason).
"""

from __future__ import annotations

import importlib

import torch

_OP = "adaml_kernels::fused_step_"


def _load() -> str | None:
    try:
        importlib.import_module(f"{__package__}._C")  # its static initializers register the ops
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}._C":
            return f"cannot be loaded: {type(e).__name__}: {e}"
        return f"not built (ADAML_BUILD_EXT=0 or build failed): {e}"
    except Exception as e:  # e.g. built against another torch: undefined symbols
        return f"cannot be loaded: {type(e).__name__}: {e}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CPU"):
        return f"loaded, but {_OP} has no CPU kernel registered"
    return None


load_error: str | None = _load()

if load_error is None:

    @torch.library.register_fake(_OP)
    def _fused_step_fake(*args, **kwargs) -> None:
        # The op updates its tensors in place and returns nothing.
        return None


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernel (i.e. nvcc was found)."""
    return load_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CUDA")


def cpu_capability() -> str:
    """The instruction set the CPU kernel runs with: "avx512", "avx2" or "default"."""
    return torch.ops.adaml_kernels.cpu_capability()


def _fused_step(bucket, hp, loss, take, grad_scale) -> None:
    torch.ops.adaml_kernels.fused_step_(*bucket.fused_op_args(hp, loss, take, grad_scale))


def cpu_step(bucket, hp, loss, take, grad_scale) -> None:
    _fused_step(bucket, hp, loss, take, grad_scale)


def cuda_step(bucket, hp, loss, take, grad_scale) -> None:
    _fused_step(bucket, hp, loss, take, grad_scale)
