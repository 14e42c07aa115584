"""Adapters for training frameworks. Each lives in its own module and imports its framework only
when that module is imported, so this package imports nothing heavy:

    from adaml_kernels.integrations.transformers import AdamLTrainer  # transformers.Trainer
    from adaml_kernels.integrations.lightning import AdamLCallback    # Lightning Trainer
    from adaml_kernels.integrations.accelerate import backward        # accelerate loops

With ``AdamL(..., telemetry=True)`` the Lightning callback and AdamLTrainer also log AdamL's
telemetry (docs/telemetry.md) on logging steps only; ``telemetry_metrics`` is the one read.

See docs/frameworks.md for complete examples and for which loss AdamL sees in each.
"""

from __future__ import annotations

import torch

from ..optimizer import AdamL

__all__ = ["find_adaml", "telemetry_metrics"]


def find_adaml(optimizer) -> AdamL | None:
    """The AdamL inside a framework's optimizer wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer, Fabric's optimizer, ...), or None if there is none.

    The wrappers keep the optimizer they wrap in ``.optimizer``; Lightning's and Fabric's also
    pose as a subclass of its class, so the attribute is followed before isinstance is asked.
    """
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(type(optimizer), "optimizer", None)
        if isinstance(inner, property) or "optimizer" in getattr(optimizer, "__dict__", {}):
            optimizer = optimizer.optimizer
            continue
        return optimizer if isinstance(optimizer, AdamL) else None
    return None


def telemetry_metrics(optimizer: AdamL, prefix: str = "adaml") -> dict[str, float]:
    """AdamL's telemetry of its last step taken as plain floats for a logger, read in one
    transfer (the one sync, on the steps that log): ``{prefix}/{figure}`` for one param group,
    ``{prefix}/group{i}/{figure}`` for several. Empty when telemetry is off."""
    if not optimizer.telemetry_enabled:
        return {}
    groups = optimizer.telemetry()
    names, values = [], []
    for i, figures in enumerate(groups):
        scope = prefix if len(groups) == 1 else f"{prefix}/group{i}"
        for key, value in figures.items():
            names.append(f"{scope}/{key}")
            values.append(value.detach().double().reshape(()).cpu())
    if not values:
        return {}
    return dict(zip(names, torch.stack(values).tolist()))
