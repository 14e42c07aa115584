"""Loader for the compiled extension adaml_kernels._C (C++ CPU and CUDA kernels).

Importing this module never raises: if the extension is missing or broken, `load_error` says
why and the backends "cpu" and "cuda" report it (backends.unavailable_reason).
"""

from __future__ import annotations

import functools
import importlib

import torch

from .layout import QUANT_BLOCK

_OP = "adaml_kernels::fused_step_"


def _load() -> str | None:
    try:
        # The module has no functions: loading it registers the ops (adaml_kernels::*).
        importlib.import_module(f"{__package__}._C")
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
    # Fake implementations (shapes and aliasing only) of every op, for FakeTensor, torch.compile
    # and opcheck. The in-place ops return nothing.
    for _name in ("fused_step_", "refresh_grads_", "fast_step_"):
        torch.library.register_fake(f"adaml_kernels::{_name}")(lambda *args, **kwargs: None)

    @torch.library.register_fake("adaml_kernels::layout_record")
    def _layout_record_fake(params, grads):
        size = sum(7 + 2 * p.dim() for p in params)
        return torch.empty(size, dtype=torch.int64, device="cpu")

    @torch.library.register_fake("adaml_kernels::quantize_8bit")
    def _quantize_8bit_fake(values, map, random=None):
        blocks = -(-values.numel() // QUANT_BLOCK)
        return values.new_empty(values.shape, dtype=torch.uint8), values.new_empty(blocks)

    @torch.library.register_fake("adaml_kernels::dequantize_8bit")
    def _dequantize_8bit_fake(codes, scales, map):
        return scales.new_empty(codes.shape)


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernel (i.e. nvcc was found)."""
    return load_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(_OP, "CUDA")


def cpu_capability() -> str:
    """The instruction set the CPU kernel runs with: "avx512", "avx2" or "default"."""
    return torch.ops.adaml_kernels.cpu_capability()


def cuda_kernel_error(device: torch.device) -> str | None:
    """Why the CUDA kernel cannot run on `device` (e.g. no code for its architecture), or None."""
    if not has_cuda_kernels():
        return "adaml_kernels._C has no CUDA kernel (no usable nvcc at build time)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _kernel_error_on(index)


@functools.cache
def _kernel_error_on(index: int) -> str | None:
    err = torch.ops.adaml_kernels.cuda_kernel_error(index)
    if not err:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return (f"the CUDA kernel was not built for this GPU (sm_{major}{minor}): {err}; rebuild "
            "with TORCH_CUDA_ARCH_LIST naming its architecture")


def fused_step(bucket, hp, inputs) -> None:
    torch.ops.adaml_kernels.fused_step_(*bucket.fused_op_args(hp, inputs))


def layout_constants() -> dict[str, int]:
    """csrc/adaml_update.h's copy of layout.constants()."""
    return dict(torch.ops.adaml_kernels.layout_constants())
