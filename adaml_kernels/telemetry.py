"""Telemetry (SPEC.md, Telemetry; docs/telemetry.md): each param group's figures of its last step
taken, measured by the kernels during the update, kept on the device and never read on the host.

With AdamL(..., telemetry=True) every bucket has a telemetry buffer (buckets.py): its launch
writes partial sums there (layout.Figure: a row per chunk in the fused kernels, per tensor in the
reference backend). After a step's launches, `Telemetry.record` sums each group's buffers into
its figures, on the device; where the step was skipped (`take`, a device value) the figures stay
those of the last step taken, selected with torch.where rather than decided on the host.
"""

from __future__ import annotations

import math

import torch

from .buckets import telemetry_dtype as figures_dtype
from .layout import FIGURES, Figure
from .loss import move

# The figures' keys, in the order of a group's figures tensor; "elements" (the number of elements
# the figures are over) lets shards be combined exactly (all_reduce).
KEYS = ("sgd_like_fraction", "update_rms", "lost_update_fraction", "saturated_fraction",
        "elements")
_ELEMENTS = FIGURES


class Telemetry:
    """Per param group, the figures of its last step taken: a tensor in KEYS' order, updated in
    place (so that a step captured in a CUDA graph updates it on every replay); `of_groups`
    hands out copies."""

    def __init__(self):
        self.figures: list[torch.Tensor | None] = []

    def record(self, group_buckets, take: torch.Tensor) -> None:
        """After a step's launches: `group_buckets` holds, per group, the (bucket, backend)
        pairs that were launched (none: the group updated no element, its figures become NaN);
        `take` is the step's 1.0/0.0 decision."""
        if len(self.figures) < len(group_buckets):
            self.figures += [None] * (len(group_buckets) - len(self.figures))
        for gi, buckets in enumerate(group_buckets):
            new = _group_figures([bucket for bucket, _ in buckets or ()], take.device)
            old = self.figures[gi]
            if old is None or old.device != new.device or old.dtype != new.dtype:
                old = self.figures[gi] = torch.full_like(new, math.nan)
                old[_ELEMENTS] = 0
            old.copy_(torch.where(move(take, new.device) != 0, new, old))

    def of_groups(self, num_groups: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """The figures as one dict of 0-dim tensors per group (NaN before its first step): views
        of a copy, which later steps leave as it is."""
        out = []
        for gi in range(num_groups):
            f = self.figures[gi] if gi < len(self.figures) else None
            if f is not None:
                f = f.clone()
            else:
                f = torch.full((len(KEYS),), math.nan, dtype=figures_dtype(device), device=device)
                f[_ELEMENTS] = 0
            out.append({key: f[i] for i, key in enumerate(KEYS)})
        return out


def _group_figures(buckets, device: torch.device) -> torch.Tensor:
    """The figures of one group's launched buckets, from their buffers' sums (on the device)."""
    n = sum(bucket.numel for bucket in buckets)
    if n == 0:
        out = torch.full((len(KEYS),), math.nan, dtype=figures_dtype(device), device=device)
        out[_ELEMENTS] = 0
        return out
    total = None
    for bucket in buckets:
        part = bucket.telemetry.sum(0)
        total = part if total is None else total + move(part, total.device)
    out = torch.cat([total / n, total.new_full((1,), n)])
    out[Figure.SQUARED_CHANGE].sqrt_()  # the mean squared change -> update_rms
    return out


def all_reduce(figures: list[dict[str, torch.Tensor]], group=None) -> list[dict[str, torch.Tensor]]:
    """Each rank's `opt.telemetry()` combined over `group` (one all-reduce): the figures over the
    elements of every rank, e.g. of the whole parameters under FSDP2, whose ranks each measure
    their shard. Every rank must call it (it is a collective)."""
    import torch.distributed as dist

    if not figures:
        return []
    weighted = []
    for f in figures:
        n = f["elements"]
        counts = torch.stack([f["sgd_like_fraction"], f["update_rms"] ** 2,
                              f["lost_update_fraction"], f["saturated_fraction"]]) * n
        # A rank whose group updated nothing contributes nothing (its NaN figures are 0 * NaN).
        weighted.append(torch.cat([torch.where(n > 0, counts, 0.0), n.reshape(1)]))
    stacked = torch.stack(weighted)
    dist.all_reduce(stacked, group=group)
    out = []
    for row in stacked:
        n = row[_ELEMENTS]
        means = row[:FIGURES] / n
        means[Figure.SQUARED_CHANGE] = means[Figure.SQUARED_CHANGE].sqrt()
        out.append({key: (means[i] if i < FIGURES else n) for i, key in enumerate(KEYS)})
    return out
