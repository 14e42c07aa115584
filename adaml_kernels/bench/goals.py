"""The issue's performance goals, checked on a run's rows (informative, never fatal)."""

from __future__ import annotations

import torch


def _find(rows, case, backend, dtype="float32"):
    for r in rows:
        if (r["case"] == case and r["backend"] == backend and r["dtype"] == dtype
                and r["median_ms"] is not None):
            return r
    return None


def goal_lines(rows: list[dict], device: torch.device) -> list[str]:
    """The issue's performance goals, checked on this run's rows (informative, never fatal)."""
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
