"""Loader for the compiled extension adaml_kernels._C (C++ CPU and CUDA kernels)."""

load_error: str | None = "not built yet"


def has_cuda_kernels() -> bool:
    return False
