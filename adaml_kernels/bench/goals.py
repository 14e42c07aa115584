"""The issue's performance goals, checked on a run's rows (informative, never fatal)."""

from __future__ import annotations

import torch

from .. import backends

# From the issue "Step latency": AdamL's step time / torch fused Adam's, per tensor count.
HOST_GOALS = {1: 0.5, 1000: 0.2, 5000: 0.2}
# From the issue "8-bit moments": time / torch fused Adam on the same parameters.
EIGHT_BIT_GOALS = {"float32": 0.60, "bfloat16": 0.75}


def _find(rows, case, backend, dtype="float32"):
    for r in rows:
        if (r["case"] == case and r["backend"] == backend and r["dtype"] == dtype
                and r["median_ms"] is not None):
            return r
    return None


def mode_goal_lines(rows: list[dict]) -> list[str]:
    """Low-precision modes (issue "Low-precision training"): a mode's time relative to torch's
    fused Adam should follow its bytes relative to Adam's, e.g. float32 parameters with bf16
    moments move 20 B against 28 B, so they should take at most 1.05 x 20/28 of Adam's time."""
    out = []
    for r in rows:
        if not r.get("mode") or r["mode"] == "default" or r["vs_torch_fused"] is None:
            continue
        fused = _find(rows, r["case"], "torch_fused", r["dtype"])
        if fused is None:
            continue
        share = r["bytes_per_param"] / fused["bytes_per_param"]
        ok = r["vs_torch_fused"] <= 1.05 * share
        out.append(f"{'PASS' if ok else 'FAIL'}  {r['backend']} time / torch fused <= 1.05 x "
                   f"bytes {r['bytes_per_param']:g}/{fused['bytes_per_param']:g} on {r['case']} "
                   f"{r['dtype']}: {r['vs_torch_fused']:.3f} (limit {1.05 * share:.3f})")
        goal = EIGHT_BIT_GOALS.get(r["dtype"]) if r["mode"] == "8bit" else None
        if goal is not None:
            out.append(f"{'PASS' if r['vs_torch_fused'] <= goal else 'FAIL'}  {r['backend']} "
                       f"8-bit time / torch fused <= {goal} on {r['case']} {r['dtype']}: "
                       f"{r['vs_torch_fused']:.3f}")
    return out


def goal_lines(rows: list[dict], device: torch.device) -> list[str]:
    """The issue's performance goals, checked on this run's rows (informative, never fatal)."""
    return _speed_goal_lines(rows, device) + mode_goal_lines(rows)


def _speed_goal_lines(rows: list[dict], device: torch.device) -> list[str]:
    out = []
    cases = sorted({(r["case"], r["dtype"], r["n_params"]) for r in rows}, key=lambda x: x[2])

    def verdict(ok):
        return "PASS" if ok else "FAIL"

    if device.type == "cpu":
        for case, dt, _n in cases:
            c, f = _find(rows, case, "cpu", dt), _find(rows, case, "torch_fused", dt)
            if c and f:
                ratio = c["median_ms"] / f["median_ms"]
                out.append(f"{verdict(ratio <= 1.05)}  cpu time / torch fused <= 1.05 on {case} "
                           f"{dt}: {ratio:.3f}")
        if not out:
            out.append("n/a   cpu backend vs torch fused: the cpu backend was not measured")
        return out
    big = [(case, n) for case, dt, n in cases if dt == "float32" and n >= 256 * 10**6]
    for case, _n in big:
        cu, f, tr = (_find(rows, case, b) for b in ("cuda", "torch_fused", "triton"))
        if cu and cu["pct_of_copy"] is not None:
            out.append(f"{verdict(cu['pct_of_copy'] >= 90)}  cuda >= 90% of copy on {case}: "
                       f"{cu['pct_of_copy']:.1f}%")
        if cu and f:
            r = cu["median_ms"] / f["median_ms"]
            out.append(f"{verdict(r <= 1.0)}  cuda no slower than torch fused on {case}: "
                       f"time ratio {r:.3f}")
        if cu and tr:
            r = tr["median_ms"] / cu["median_ms"]
            out.append(f"{verdict(r <= 1.10)}  triton within 10% of cuda on {case}: "
                       f"time ratio {r:.3f}")
    cu, f = _find(rows, "many_small", "cuda"), _find(rows, "many_small", "torch_fused")
    if cu and f:
        s = f["median_ms"] / cu["median_ms"]
        out.append(f"{verdict(s >= 1.3)}  cuda >= 1.3x faster than torch fused on many_small: "
                   f"{s:.2f}x")
    if not out:
        out.append("n/a   the GPU goals need fp32 cuda rows (>= 256M params, many_small)")
    return out


def host_goal_lines(rows: list[dict]) -> list[str]:
    """The host-overhead goals, per fused AdamL backend (eager steps, gradients replaced)."""
    out = []
    for r in rows:
        n, goal = r["n_tensors"], HOST_GOALS.get(r["n_tensors"])
        if goal is None or r["backend"] not in backends.NAMES or not backends.is_fused(
                r["backend"]):
            continue
        what = (f"{r['backend']} / torch fused <= {goal} at {n:,} tensor{'s' if n != 1 else ''} "
                f"({r['dtype']})")
        if r["vs_torch_fused"] is None:
            out.append(f"n/a   {what}: not measured ({r['skipped'] or 'no torch fused time'})")
            continue
        ok = r["vs_torch_fused"] <= goal
        fused_us = r["us_per_step"] / r["vs_torch_fused"]
        out.append(f"{'PASS' if ok else 'FAIL'}  {what}: {r['vs_torch_fused']:.3f} "
                   f"({r['us_per_step']:.1f} vs {fused_us:.1f} us/step)")
    if not out:
        out.append("n/a   the host-overhead goals need fused AdamL rows at 1, 1,000 or 5,000 "
                   "tensors")
    return out
