"""The peak-memory check: what one opt.step allocates beyond the state (CUDA only)."""

from __future__ import annotations

import gc

import torch

from .cases import Case
from .contenders import contenders_for, unsupported_reason
from .environment import environment
from .errors import reason
from .params import Filler, make_set


def run_memory_check(device: torch.device, cases: list[Case], dtype: torch.dtype,
                     wanted=None, log=print, modes=("default",)) -> list[dict]:
    """Peak memory one ``opt.step`` allocates beyond what was allocated before it (CUDA only).

    Per case and optimizer: one set of parameters, two warm-up steps (state and tables built),
    then reset_peak_memory_stats, one step, and extra = max_memory_allocated - allocated before.
    """
    if device.type != "cuda":
        raise RuntimeError("the memory check needs a CUDA device (--device cuda)")
    env = environment(device)
    contenders, _ = contenders_for(device, wanted, modes)
    contenders = [c for c in contenders if c.applies(dtype)]
    rows = []
    loss = torch.tensor(2.0, device=device)
    for case in cases:
        filler = Filler(device, 0)
        try:
            params = make_set(case, dtype, device, filler)
        except Exception as e:
            log(f"note: memory check {case.name}: cannot allocate the parameters ({reason(e)})")
            continue
        for c in contenders:
            row = {"case": case.name, "backend": c.name, "n_params": case.n_params,
                   "n_tensors": case.n_tensors, "dtype": str(dtype).replace("torch.", ""),
                   "device_name": env["device_name"], "state_bytes": None,
                   "extra_peak_bytes": None, "skipped": unsupported_reason(c, dtype)}
            if row["skipped"] is None:
                opt = None
                try:
                    torch.cuda.synchronize()
                    before_state = torch.cuda.memory_allocated(device)
                    opt = c.make(params)
                    for _ in range(2):
                        c.step(opt, loss)
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    c.step(opt, loss)
                    torch.cuda.synchronize()
                    row["state_bytes"] = base - before_state
                    row["extra_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
                except Exception as e:
                    row["skipped"] = reason(e)
                opt = None
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
        params = None
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def format_memory_table(rows: list[dict]) -> str:
    w = max([14] + [len(r["backend"]) for r in rows])
    head = f"{'case':<12} {'backend':<{w}} {'params':>13} {'tensors':>7} {'dtype':<9} " \
           f"{'state MB':>10} {'extra peak bytes':>17}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["skipped"]:
            tail = f"  skipped: {r['skipped']}"
            lines.append(f"{r['case']:<12} {r['backend']:<{w}} {r['n_params']:>13,} "
                         f"{r['n_tensors']:>7} {r['dtype']:<9}{tail}")
        else:
            lines.append(f"{r['case']:<12} {r['backend']:<{w}} {r['n_params']:>13,} "
                         f"{r['n_tensors']:>7} {r['dtype']:<9} {r['state_bytes'] / 2**20:>10.1f} "
                         f"{r['extra_peak_bytes']:>17,}")
    return "\n".join(lines)
