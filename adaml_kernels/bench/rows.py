"""The row each measurement fills: one per case, dtype and optimizer, as the JSON writes it."""

from __future__ import annotations

import torch

from .cases import Case
from .contenders import Contender

# Keys every timing row has (JSON consumers rely on them).
REQUIRED_KEYS = (
    "backend", "n_params", "n_tensors", "dtype", "median_ms", "gbps", "pct_of_copy",
    "vs_torch_fused",
)


def base_row(case: Case, dtype: torch.dtype, c: Contender, env: dict) -> dict:
    bpp = c.bytes_per_param(dtype)
    return {
        "case": case.name,
        "kind": case.kind,
        "backend": c.name,
        "mode": c.mode.name if c.family == "adaml" else None,
        "optimizer": "AdamL" if c.family == "adaml" else "torch.optim.Adam",
        "n_params": case.n_params,
        "n_tensors": case.n_tensors,
        "dtype": str(dtype).replace("torch.", ""),
        "bytes_per_param": bpp,
        "bytes_moved": bpp * case.n_params,
        "device": env["device"],
        "device_name": env["device_name"],
        "torch_version": env["torch_version"],
        "triton_version": env["triton_version"],
        "threads": env["threads"],
        "cpu_busy_pct_at_start": env["cpu_busy_pct_at_start"],
        "median_ms": None, "p10_ms": None, "p90_ms": None, "min_ms": None, "host_ms": None,
        "reps": 0, "sets": 0, "gbps": None, "copy_gbps": None, "pct_of_copy": None,
        "vs_torch_fused": None, "speedup_vs_torch_fused": None, "skipped": None,
    }
