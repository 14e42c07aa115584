"""The one place where a backend is chosen.

    reference  pure PyTorch, any device and dtype; the tests' oracle
    triton     one fused Triton kernel per bucket; CUDA, or CPU under TRITON_INTERPRET=1
    cpu        fused C++ kernel from adaml_kernels._C (OpenMP + SIMD)
    cuda       fused CUDA kernel from adaml_kernels._C

"auto" picks, per device and dtype, the first available entry of AUTO_ORDER that can run on that
very device (e.g. the CUDA kernel only where the build has code for the GPU's architecture).
Under "auto", a tensor the fused kernels cannot walk as one flat array (a parameter that is not
dense, or a gradient laid out unlike its parameter) takes the reference path; `describe()` on the
optimizer shows which path each bucket takes. A fused backend asked for by name updates a
parameter that is not dense through dense copies (staging.py). A backend asked for by name that
cannot run, or cannot take a tensor (a gradient laid out unlike its dense parameter), raises
with the reason; nothing ever falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch

from .tensor_checks import fits_fused_kernels

NAMES = ("reference", "triton", "cpu", "cuda")
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_HALF_AND_FLOAT = frozenset({torch.float32, torch.float16, torch.bfloat16})


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str  # the module holding ...
    function: str  # ... the function step(bucket, hp, inputs)
    fused: bool  # reads tensors through the bucket's pointer table
    device_types: tuple[str, ...]
    dtypes: frozenset | None  # None: every floating dtype


INFO = {
    "reference": BackendInfo(
        "reference", "reference", "step", False, ("cpu", "cuda", "mps", "xpu"), None
    ),
    "triton": BackendInfo(
        "triton", "triton_kernel", "step", True, ("cuda", "cpu"), _HALF_AND_FLOAT
    ),
    "cpu": BackendInfo(
        "cpu", "_extension", "fused_step", True, ("cpu",), _HALF_AND_FLOAT | {torch.float64}
    ),
    "cuda": BackendInfo("cuda", "_extension", "fused_step", True, ("cuda",), _HALF_AND_FLOAT),
}


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # the reason is reported, never swallowed
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend `name` cannot run (on `device`, if given), or None if it can."""
    if name not in INFO:
        raise ValueError(f"unknown backend {name!r}; choose from {NAMES} or 'auto'")
    dev_type = None if device is None else torch.device(device).type
    info = INFO[name]
    if dev_type is not None and dev_type not in info.device_types:
        return f"backend {name!r} does not run on {dev_type} tensors"
    if name == "triton":
        err = _import_error("triton")
        if err:
            return f"triton cannot be imported ({err})"
        if dev_type in (None, "cpu") and not _triton_interpreting():
            if dev_type == "cpu" or not torch.cuda.is_available():
                return "triton runs CPU tensors only under TRITON_INTERPRET=1, and no GPU is here"
        if dev_type == "cuda" and _triton_interpreting():
            return "TRITON_INTERPRET=1 is set: triton runs on the CPU interpreter, not the GPU"
        return None
    if name in ("cpu", "cuda"):
        from . import _extension

        if _extension.load_error is not None:
            return f"the C++/CUDA extension adaml_kernels._C is not usable: {_extension.load_error}"
        if name == "cuda":
            if not _extension.has_cuda_kernels():
                return "adaml_kernels._C has no CUDA kernel (no usable nvcc at build time)"
            if not torch.cuda.is_available():
                return "no CUDA device is available"
            if dev_type == "cuda":
                return _extension.cuda_kernel_error(torch.device(device))
        return None
    return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that work on this machine (for `device`, if given)."""
    return [n for n in NAMES if unavailable_reason(n, device) is None]


def unavailable_backends(device: torch.device | str | None = None) -> dict[str, str]:
    """Backend name -> the reason it cannot run on this machine (or on `device`)."""
    reasons = {n: unavailable_reason(n, device) for n in NAMES}
    return {n: r for n, r in reasons.items() if r is not None}


def select(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that updates parameters of `dtype` on `device`."""
    if requested == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if _supports_dtype(name, dtype) and unavailable_reason(name, device) is None:
                return name
        raise RuntimeError(f"no AdamL backend supports {dtype} parameters on {device}")
    reason = unavailable_reason(requested, device)
    if reason is not None:
        raise RuntimeError(f"AdamL backend {requested!r} is not available: {reason}")
    if not _supports_dtype(requested, dtype):
        raise ValueError(
            f"backend {requested!r} does not support {dtype} parameters "
            f"(it supports {sorted(str(d) for d in INFO[requested].dtypes)})"
        )
    return requested


def select_for_tensor(requested: str, p: torch.Tensor, g: torch.Tensor) -> str:
    """The backend for parameter p with gradient g (see the module docstring on layouts)."""
    name = select(requested, p.device, p.dtype)
    if requested == "auto" and INFO[name].fused and not fits_fused_kernels(p, g):
        return "reference"
    return name


def check_name(requested: str) -> None:
    if requested != "auto" and requested not in INFO:
        raise ValueError(f"Invalid backend: {requested!r} (choose from {NAMES} or 'auto')")


def _supports_dtype(name: str, dtype: torch.dtype) -> bool:
    dtypes = INFO[name].dtypes
    return dtypes is None or dtype in dtypes


@functools.cache
def step_function(name: str):
    """step(bucket, hp, inputs) of backend `name` (inputs: loss.StepInputs on its device)."""
    info = INFO[name]
    return getattr(importlib.import_module(f"{__package__}.{info.module}"), info.function)


def is_fused(name: str) -> bool:
    return INFO[name].fused
