"""How steps are timed: the timer, how many steps to time, and how many input sets to rotate."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


class Timer:
    """Seconds of one call: CUDA events on a GPU (the stream idle at the start), else perf_counter.

    `time` returns (device seconds, host seconds); on the CPU both are the same wall time.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
            self.start.record()
            h0 = time.perf_counter()
            fn()
            h1 = time.perf_counter()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3, h1 - h0
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter() - t0
        return t, t

    @property
    def method(self) -> str:
        return "cuda_events" if self.cuda else "perf_counter"


@dataclass
class Policy:
    """How long to measure: timed steps per (case, optimizer) = target time / estimated step."""

    target_s: float
    min_reps: int
    max_reps: int
    ref_target_s: float
    ref_min_reps: int
    ref_max_params: int | None  # the reference is measured only up to this size (None: all)
    max_sets: int = 4

    def reps(self, est_s: float, sets: int, reference=False) -> int:
        target, lo = (self.ref_target_s, self.ref_min_reps) if reference else (
            self.target_s, self.min_reps)
        if est_s * lo > 4 * max(target, 0.05):  # slow steps: 3 are enough for a median
            lo = min(lo, 3)
        r = min(max(math.ceil(target / max(est_s, 1e-7)), lo), max(self.max_reps, lo))
        return -(-r // sets) * sets


def make_policy(device: torch.device, quick: bool, smoke: bool) -> Policy:
    if smoke:
        return Policy(0.0, 3, 3, 0.0, 2, None, max_sets=2)
    if device.type == "cuda":
        if quick:
            return Policy(0.1, 10, 100, 0.05, 3, None)
        return Policy(0.3, 20, 200, 0.1, 5, None)
    if quick:
        return Policy(0.25, 5, 30, 0.0, 3, 4 << 20)
    return Policy(1.0, 10, 100, 0.0, 3, 64 << 20)


def rotation_sets(step_bytes: int, cache_bytes: int, max_sets: int) -> int:
    """Sets to cycle so that > 2x the cache is touched between two visits of one set.

    One set is enough once a single step touches 4x the cache: it evicts its own data.
    """
    if step_bytes >= 4 * cache_bytes:
        return 1
    return max(2, min(max_sets, 1 + math.ceil(2 * cache_bytes / max(step_bytes, 1))))


def stats(seconds: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "reps": int(ms.size),
    }
