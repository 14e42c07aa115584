"""The experiments by name, and what running one adds to its result: the time and the machine
(`run_experiment`), its JSON file (`write_json`) and a few lines for the terminal (`summary`).
Used by cli.py (one experiment) and report.py (all of them)."""

from __future__ import annotations

import json
import math
import os
import platform
import time

import torch

from . import digits, functions, lstm, wgan
from .common import adaml_backend

EXPERIMENTS = {"functions": functions, "digits": digits, "lstm": lstm, "wgan": wgan}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "adaml_backend": adaml_backend("cpu", torch.float32),
        "adaml_backend_float64": adaml_backend("cpu", torch.float64),
    }


def run_experiment(name: str, quick: bool, seeds: int, sweep: bool = True) -> dict:
    start = time.perf_counter()
    result = EXPERIMENTS[name].run(quick=quick, seeds=seeds, sweep=sweep)
    result["meta"] = {"experiment": name, "quick": quick, "seconds": time.perf_counter() - start,
                      "machine": machine()}
    return result


def write_json(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(result), f, indent=1)


def _clean(x):
    """JSON has no inf or nan: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def summary(name: str, result: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{name}: {result['meta']['seconds']:.1f} s, AdamL backend "
             f"{result['meta']['machine']['adaml_backend']}"]
    if name == "functions":
        for prob, res in result["problems"].items():
            for opt, best in res["best"].items():
                hit = best["iters_to_tol"]
                lines.append(f"  {prob:10s} {opt:10s} lr={best['lr']:<6g} "
                             + (f"{hit} iterations" if hit is not None else
                                f"not reached, best gap {best['best_gap']:.2e}")
                             + f" ({best['minimum']} minimum)")
    else:
        key = {"digits": "final_acc_mean_std", "lstm": "final_ppl_mean_std",
               "wgan": "final_mmd_mean_std"}[name]
        for opt, r in result["runs"].items():
            m, s = r[key]
            lines.append(f"  {opt:16s} {key.split('_mean')[0]} {m:.4g} ± {s:.2g}")
        lines.append(f"  AdamL vs: {result['verdicts']}")
        if "eps_ablation" in result:
            abl = result["eps_ablation"]
            for opt, r in abl["runs"].items():
                m, s = r[key]
                lines.append(f"  {opt:16s} eps={abl['eps']:g}: {m:.4g} ± {s:.2g}")
            lines.append(f"  AdamL vs (eps={abl['eps']:g}): {abl['verdicts']}")
    return "\n".join(lines)
