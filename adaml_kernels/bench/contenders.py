"""What is compared (AdamL's backends, torch's Adam, a copy) and the traffic model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import backends
from ..buckets import moment_dtype
from ..optimizer import AdamL
from .cases import Case
from .modes import DEFAULT, MODES, Mode

LR = 1e-3
ADAML_BACKENDS = backends.NAMES  # reference, triton, cpu, cuda
TORCH_CONTENDERS = ("torch_fused", "torch_foreach")


@dataclass
class Contender:
    # the JSON `backend`: reference, triton, cpu, cuda, torch_fused, torch_foreach, or an AdamL
    # backend with a low-precision mode, e.g. cpu+master (modes.py)
    name: str
    family: str  # "adaml", "torch" or "copy"
    make: Callable  # params -> optimizer
    step: Callable  # (optimizer, loss) -> None
    mode: Mode = field(default=DEFAULT)
    backend: str = ""  # the AdamL backend ("" for the others)

    def applies(self, dtype: torch.dtype) -> bool:
        """Whether this contender is measured for parameters of `dtype` (its mode concerns them)."""
        return self.mode.applies(dtype)

    def bytes_per_param(self, dtype: torch.dtype) -> float:
        return traffic_per_param(self.family, dtype, self.mode)

    def state_bytes(self, case: Case, dtype: torch.dtype) -> int:
        """Optimizer state of one set of parameters."""
        if self.family == "copy":  # source and destination, traffic / 2 bytes each
            return traffic_per_param("adaml", dtype) * case.n_params + 64
        if self.family == "adaml":
            ms = self.mode.moment_bytes(dtype)
            master = 4 * case.n_params + 64 * case.n_tensors if self.mode.master(dtype) else 0
            return (2 * ms * case.n_params + 2 * 64 * case.n_tensors + 16 * case.n_tensors
                    + master)
        return 2 * elem_size(dtype) * case.n_params + 8 * case.n_tensors

    def scratch_bytes(self, case: Case, dtype: torch.dtype) -> int:
        """A generous estimate of what one step allocates on top of the state."""
        cs = elem_size(moment_dtype(dtype))
        if self.name == "reference":  # one tensor at a time, a dozen temporaries
            return 12 * cs * case.max_numel
        if self.name == "torch_foreach":  # e.g. the sqrt of every exp_avg_sq at once
            return 3 * elem_size(dtype) * case.n_params
        return 64 * case.n_tensors + (1 << 20)


def traffic_per_param(family: str, dtype: torch.dtype, mode: Mode = DEFAULT) -> int:
    if family in ("adaml", "copy"):
        return mode.traffic(dtype)
    return 7 * elem_size(dtype)


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _copy_buffers(params):
    """float32 source and destination whose copy moves what an AdamL step on `params` moves."""
    traffic = traffic_per_param("adaml", params[0].dtype) * sum(p.numel() for p in params)
    n = max(1, traffic // 8)
    src = torch.empty(n, device=params[0].device)
    src.fill_(1.5)
    return src, torch.empty_like(src)


def _copy_step(buffers, _loss) -> None:
    src, dst = buffers
    dst.copy_(src)


# The copy baseline is timed like an optimizer, interleaved with them: bytes = read + write.
COPY = Contender("copy", "copy", _copy_buffers, _copy_step)


def adaml_contender(name: str, mode: Mode = DEFAULT) -> Contender:
    label = name if mode is DEFAULT else f"{name}+{mode.name}"
    return Contender(
        label, "adaml", lambda ps: AdamL(ps, lr=LR, backend=name, **mode.options),
        lambda opt, loss: opt.step(loss), mode, name,
    )


def torch_adam_contender(name: str) -> Contender:
    kw = {"fused": True} if name == "torch_fused" else {"foreach": True}
    return Contender(
        name, "torch", lambda ps: torch.optim.Adam(ps, lr=LR, **kw), lambda opt, loss: opt.step()
    )


def contenders_for(device: torch.device, wanted=None,
                   modes=("default",)) -> tuple[list[Contender], list[str]]:
    """The optimizers to measure on `device`, and notes on the AdamL backends left out.

    Each fused AdamL backend runs in every mode of `modes` (names of modes.MODES); the
    reference in the default mode only (it is slow). A mode is measured only for the parameter
    dtypes it concerns (Contender.applies)."""
    notes = []
    available = backends.available_backends(device)
    chosen = []
    for name in ADAML_BACKENDS:
        if wanted is not None and name not in wanted:
            continue
        if name == "triton" and device.type == "cpu":
            if name in available:
                notes.append("triton: skipped on the CPU (TRITON_INTERPRET=1 is an interpreter)")
            continue
        if name in available:
            chosen.append(adaml_contender(name))
            if backends.is_fused(name):
                chosen += [adaml_contender(name, MODES[m]) for m in modes if m != "default"]
        else:
            reason = backends.unavailable_reason(name, device)
            if device.type in backends.INFO[name].device_types:
                notes.append(f"{name}: unavailable ({reason})")
    for name in TORCH_CONTENDERS:
        if wanted is None or name in wanted:
            chosen.append(torch_adam_contender(name))
    return chosen, notes


def unsupported_reason(c: Contender, dtype: torch.dtype) -> str | None:
    """Why `c` cannot step parameters of `dtype`, or None when it can."""
    if c.family == "adaml":
        dtypes = backends.INFO[c.backend].dtypes
        if dtypes is not None and dtype not in dtypes:
            return f"backend {c.name!r} does not support {dtype}"
    return None


def is_fused_adaml(c: Contender) -> bool:
    return c.family == "adaml" and backends.is_fused(c.backend)
