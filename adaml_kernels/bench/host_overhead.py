"""The host-overhead case: many one-element tensors whose gradients are new at every step.

On a GPU the update itself is short, so a model with many tensors waits on the host work around
the launches. Every optimizer steps the same N one-element parameters with one CPU thread.
Before each step every parameter is handed a gradient tensor other than the one of its previous
step (a rotation of pre-made sets, as zero_grad() + backward() hand over new tensors), outside
the timed call. On CUDA, a captured AdamL step replayed from a CUDA graph is the lower bound.
"""

from __future__ import annotations

import gc
import itertools
import time

import torch

from .cases import Case
from .contenders import Contender, contenders_for, is_fused_adaml
from .environment import OthersCpu, environment
from .errors import reason
from .params import Filler, make_set
from .rows import base_row
from .run import release, run_batch
from .timing import Policy, Timer, stats

HOST_COUNTS = (1, 100, 1000, 5000)
SMOKE_COUNTS = (1, 10)
GRAD_SETS = 3  # > 1, so that consecutive steps never see the same gradient tensors
HOST_KEYS = ("case", "backend", "n_tensors", "dtype", "threads", "grads", "us_per_step",
             "p10_us", "p90_us", "host_us", "us_per_tensor", "vs_torch_fused", "reps", "skipped")


def host_policy(quick: bool, smoke: bool) -> Policy:
    """Steps of microseconds: many reps are cheap; one set (the data is a few KB at most)."""
    if smoke:
        return Policy(0.0, 3, 3, 0.0, 2, None, max_sets=1)
    if quick:
        return Policy(0.1, 20, 2000, 0.05, 3, None, max_sets=1)
    return Policy(0.4, 50, 20000, 0.2, 5, None, max_sets=1)


def host_contenders(device: torch.device, wanted=None) -> tuple[list[Contender], list[str]]:
    """AdamL's fused backends (the reference only when asked for) and torch's Adam."""
    found, notes = contenders_for(device, wanted)
    chosen = []
    for c in found:
        asked = wanted is not None and c.name in wanted
        if c.family == "adaml" and not is_fused_adaml(c) and not asked:
            notes.append(f"{c.name}: not fused, left out (ask with --backends {c.name})")
        else:
            chosen.append(c)
    return chosen, notes


def _grad_sets(params, filler: Filler) -> list[list[torch.Tensor]]:
    sets = [[p.grad for p in params]]
    with torch.no_grad():
        for _ in range(GRAD_SETS - 1):
            fresh = [torch.empty_like(p) for p in params]
            for g in fresh:
                filler.fill(g, 1e-3)
            sets.append(fresh)
    return sets


def _fill_host_fields(row: dict, n: int, grads: str) -> None:
    row["grads"] = grads
    for key in ("us_per_step", "p10_us", "p90_us", "host_us", "us_per_tensor"):
        row[key] = None
    if row["median_ms"] is not None:
        row["us_per_step"] = row["median_ms"] * 1e3
        row["p10_us"], row["p90_us"] = row["p10_ms"] * 1e3, row["p90_ms"] * 1e3
        row["host_us"] = row["host_ms"] * 1e3
        row["us_per_tensor"] = row["us_per_step"] / n


def _graph_row(c: Contender, case: Case, dtype, params, grads, timer: Timer, policy: Policy,
               env: dict) -> dict:
    """A captured AdamL step replayed from a CUDA graph: no host work per step, fixed gradients.

    A failed capture or replay is a row with the reason, not a crash.
    """
    row = base_row(case, dtype, Contender(f"{c.name}+graph", c.family, c.make, c.step), env)
    opt = graph = None
    try:
        for p, g in zip(params, grads):
            p.grad = g
        opt = c.make(params)
        static_loss = torch.tensor(2.0, device=params[0].device)
        # Warm up on a side stream (state, tables, kernels), then capture one step.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                c.step(opt, static_loss)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            c.step(opt, static_loss)
        graph.replay()
        timer.sync()
        est, _ = timer.time(graph.replay)
        times, hosts = [], []
        for _ in range(policy.reps(est, 1)):
            t, h = timer.time(graph.replay)
            times.append(t)
            hosts.append(h)
        row.update(stats(times))
        row["host_ms"] = stats(hosts)["median_ms"]
        row["sets"] = 1
    except Exception as e:
        row["skipped"] = f"CUDA graph capture or replay failed: {reason(e)}"
    graph = opt = None
    try:
        release(timer, collect=True)
    except Exception as e:  # a broken capture can leave the stream unusable: say so
        row["skipped"] = row["skipped"] or f"after the replay: {reason(e)}"
    _fill_host_fields(row, case.n_tensors, "fixed (CUDA graph)")
    return row


def run_host_case(n: int, dtype: torch.dtype, device: torch.device, contenders, policy: Policy,
                  timer: Timer, env: dict, seed: int = 0) -> list[dict]:
    """Every contender on the same n one-element parameters, interleaved in turns."""
    case = Case("host", f"host_{n}", [(1,)] * n)
    filler = Filler(device, seed)
    params = make_set(case, dtype, device, filler)
    grad_sets = _grad_sets(params, filler)
    turn = itertools.cycle(grad_sets)

    def new_grads():  # what zero_grad(set_to_none=True) + backward() leave behind
        for p, g in zip(params, next(turn)):
            p.grad = g

    rows = {c.name: base_row(case, dtype, c, env) for c in contenders}
    loss = torch.tensor(2.0, device=device)
    run_batch(contenders, [params], loss, timer, policy, rows, None, prepare=new_grads)
    out = list(rows.values())
    for row in out:
        _fill_host_fields(row, n, "replaced every step")
    if device.type == "cuda":
        out += [_graph_row(c, case, dtype, params, grad_sets[0], timer, policy, env)
                for c in contenders if is_fused_adaml(c)]
    fused = rows.get("torch_fused")
    for row in out:
        if fused and fused["median_ms"] and row["median_ms"] is not None:
            row["vs_torch_fused"] = row["median_ms"] / fused["median_ms"]
            row["speedup_vs_torch_fused"] = fused["median_ms"] / row["median_ms"]
        row["timer"] = timer.method
    return out


def run_host_overhead(device: torch.device, counts, dtypes, wanted=None, quick=False,
                      smoke=False, log=print) -> tuple[list[dict], dict]:
    """The host-overhead case for each count and dtype, with one thread. Returns (rows, info)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work is what is measured: no help from other cores
    try:
        env = environment(device)
        contenders, notes = host_contenders(device, wanted)
        policy, timer = host_policy(quick, smoke), Timer(device)
        rows = []
        for dtype in dtypes:
            for n in counts:
                t0, others = time.perf_counter(), OthersCpu()
                try:
                    case_rows = run_host_case(n, dtype, device, contenders, policy, timer, env)
                except Exception as e:  # one broken count must not lose the others' numbers
                    log(f"error: host_{n} {dtype}: {reason(e)}")
                    case = Case("host", f"host_{n}", [(1,)] * n)
                    case_rows = [base_row(case, dtype, c, env) for c in contenders]
                    for row in case_rows:
                        row["skipped"] = f"the case failed: {reason(e)}"
                        _fill_host_fields(row, n, "replaced every step")
                others_pct = others.pct() if device.type == "cpu" else None
                for row in case_rows:
                    row["case_wall_s"] = round(time.perf_counter() - t0, 2)
                    row["others_cpu_pct"] = others_pct
                rows += case_rows
                gc.collect()
    finally:
        torch.set_num_threads(threads)
    info = {"env": env, "notes": notes, "timer": timer.method, "grad_sets": GRAD_SETS,
            "contenders": [c.name for c in contenders]}
    return rows, info
