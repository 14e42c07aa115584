"""Parameter sets: leaf tensors with gradients, filled with finite, non-trivial values."""

from __future__ import annotations

import torch

from .cases import Case


class Filler:
    """Fills tensors from a random base buffer (cheaper than generating every value)."""

    def __init__(self, device: torch.device, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn((1 << 20) + 7, generator=g).to(device)
        self.offset = 0

    def fill(self, t: torch.Tensor, scale: float) -> None:
        flat = t.view(-1)
        n, b = flat.numel(), self.base.numel()
        start = 0
        while start < n:
            o = self.offset % b
            k = min(n - start, b - o)
            flat[start:start + k].copy_(self.base[o:o + k] * scale)
            start += k
            self.offset += k + 13


def make_set(case: Case, dtype: torch.dtype, device: torch.device, filler: Filler):
    """Leaf parameters of `case`'s shapes with gradients; values are finite and non-trivial."""
    params = []
    with torch.no_grad():
        for shape in case.shapes:
            p = torch.empty(shape, dtype=dtype, device=device)
            filler.fill(p, 0.02)
            g = torch.empty_like(p)
            filler.fill(g, 1e-3)
            p.requires_grad_(True)
            p.grad = g
            params.append(p)
    return params
