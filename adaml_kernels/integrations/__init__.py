"""Adapters for training frameworks. Each lives in its own module and imports its framework only
when that module is imported, so this package imports nothing heavy:

    from adaml_kernels.integrations.transformers import AdamLTrainer  # transformers.Trainer
    from adaml_kernels.integrations.lightning import AdamLCallback    # Lightning Trainer
    from adaml_kernels.integrations.accelerate import backward        # accelerate loops

See docs/frameworks.md for complete examples and for which loss AdamL sees in each.
"""

from __future__ import annotations

from ..optimizer import AdamL

__all__ = ["find_adaml"]


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
