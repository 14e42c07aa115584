"""Running the sweep and list cases: every contender on the same tensors, interleaved in turns."""

from __future__ import annotations

import gc
import math
import sys
import time
from dataclasses import dataclass

import torch

from .cases import Case, list_cases, size_label, sweep_cases
from .contenders import COPY, contenders_for, elem_size, traffic_per_param, unsupported_reason
from .environment import OthersCpu, environment, free_memory_bytes, last_level_cache_bytes
from .errors import is_oom, reason
from .params import Filler, make_set
from .rows import base_row
from .timing import Policy, Timer, make_policy, rotation_sets, stats

def run_batch(batch, sets, loss, timer: Timer, policy: Policy, rows: dict, progress,
              prepare=None) -> None:
    """Warm up, then time `batch`'s optimizers cycle by cycle, interleaved. Fills rows[c.name].

    `prepare`, when given, runs before every step outside the timed call (the host-overhead
    case hands over new gradients there, as backward() would).
    """
    prepare = prepare or (lambda: None)
    k = len(sets)
    order = list(range(1, k)) + [0]  # the warm-up ends on set 0: start the cycles elsewhere
    opts, reps, times, hosts = {}, {}, {}, {}
    for c in batch:
        try:
            opts[c.name] = [c.make(ps) for ps in sets]
            for s in range(k):
                prepare()
                c.step(opts[c.name][s], loss)
            timer.sync()
            prepare()
            est, _ = timer.time(lambda: c.step(opts[c.name][0], loss))
            reps[c.name] = policy.reps(est, k, reference=c.name == "reference")
            times[c.name], hosts[c.name] = [], []
        except Exception as e:
            rows[c.name]["skipped"] = reason(e)
            opts.pop(c.name, None)
            release(timer, collect=True)
    # Turns: each optimizer in its turn takes `lead` untimed steps, then `block` timed ones.
    # The first steps after another optimizer's run slower (they write back its dirty cache
    # lines, and more): the lead-in keeps that cost, which depends on the order, out of the
    # numbers. Whole cycles over the sets keep the distance between visits of a set.
    lead = order if k > 1 else [0]
    block = k * max(2, math.ceil(4 / k))
    active = [c for c in batch if c.name in reps]
    turn = 0
    while active:
        # Rotate who goes first, so that no optimizer always follows the same one.
        shift = turn % len(active)
        turn += 1
        for c in active[shift:] + active[:shift]:
            opt_list = opts[c.name]
            try:
                for s in lead:
                    prepare()
                    c.step(opt_list[s], loss)
                n_timed = min(block, reps[c.name] - len(times[c.name]))
                for i in range(n_timed):
                    s = order[i % k]
                    prepare()
                    t, h = timer.time(lambda: c.step(opt_list[s], loss))
                    times[c.name].append(t)
                    hosts[c.name].append(h)
            except Exception as e:
                rows[c.name]["skipped"] = reason(e)
                reps[c.name] = 0
        active = [c for c in active if len(times[c.name]) < reps[c.name]]
    for c in batch:
        row = rows[c.name]
        if row["skipped"] is None and times.get(c.name):
            st = stats(times[c.name])
            row.update(st)
            row["host_ms"] = stats(hosts[c.name])["median_ms"]
            row["sets"] = k
            row["gbps"] = row["bytes_moved"] / (st["median_ms"] / 1e3) / 1e9
        if progress is not None:
            progress.update(1)
    opts.clear()
    release(timer, collect=_big(sets))


def _big(sets) -> bool:
    return sum(p.numel() * p.element_size() for ps in sets for p in ps) > (256 << 20)


def release(timer: Timer, collect: bool = True) -> None:
    """Give memory back (tensors die by reference counting; gc.collect only for big cases)."""
    if collect:
        gc.collect()
    if timer.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_case(case, dtype, device, contenders, policy, timer, env, budget_fraction,
             cache_bytes, progress=None, log=print, seed=0) -> list[dict]:
    """Measure every contender on `case`; one row each (skipped rows carry the reason). A
    contender whose low-precision mode does not concern `dtype` has no row."""
    contenders = [c for c in contenders if c.applies(dtype)]
    rows = {c.name: base_row(case, dtype, c, env) for c in contenders}
    todo = []
    for c in contenders:
        why = unsupported_reason(c, dtype)
        if why is None and c.name == "reference" and policy.ref_max_params is not None and (
                case.n_params > policy.ref_max_params):
            why = (f"reference limited to <= {size_label(policy.ref_max_params)} params "
                   "in this mode (it is slow)")
        if why is None:
            todo.append(c)
        else:
            rows[c.name]["skipped"] = why
            if progress is not None:
                progress.update(1)

    # The copy first (it then shares a batch with the fast optimizers), the reference last.
    todo = [COPY] + sorted(todo, key=lambda c: c.name == "reference")
    rows["copy"] = base_row(case, dtype, COPY, env)
    adaml_traffic = traffic_per_param("adaml", dtype) * case.n_params
    big = adaml_traffic > (512 << 20)

    # As many rotation sets as the cache asks for and the memory budget allows, for everyone.
    budget = int(budget_fraction * free_memory_bytes(device))
    set_bytes = 2 * elem_size(dtype) * case.n_params + 1024 * case.n_tensors
    k = rotation_sets(adaml_traffic, cache_bytes, policy.max_sets)

    def need(c, k):
        return k * c.state_bytes(case, dtype) + c.scratch_bytes(case, dtype)

    while k > 1 and k * set_bytes + max(need(c, k) for c in todo) > budget:
        k -= 1
    fitting = []
    for c in todo:
        if k * set_bytes + need(c, k) <= budget:
            fitting.append(c)
        else:
            gb = (k * set_bytes + need(c, k)) / 1e9
            rows[c.name]["skipped"] = (
                f"needs ~{gb:.1f} GB, over the memory budget of {budget / 1e9:.1f} GB")
            log(f"note: {case.name} {dtype} {c.name}: skipped, {rows[c.name]['skipped']}")
            if progress is not None:
                progress.update(1)
    if fitting == [COPY]:  # no optimizer to compare with
        fitting = []
        rows["copy"]["skipped"] = "no optimizer of this case fits in memory"
        if progress is not None:
            progress.update(1)
    # Interleave the optimizers whose state fits together; the rest come in later batches.
    batches, current, used, scratch = [], [], k * set_bytes, 0
    for c in fitting:
        state = k * c.state_bytes(case, dtype)
        if current and used + state + max(scratch, c.scratch_bytes(case, dtype)) > budget:
            batches.append(current)
            current, used, scratch = [], k * set_bytes, 0
        current.append(c)
        used += state
        scratch = max(scratch, c.scratch_bytes(case, dtype))
    if current:
        batches.append(current)

    if batches:
        try:
            filler = Filler(device, seed)
            sets = [make_set(case, dtype, device, filler) for _ in range(k)]
        except Exception as e:
            if not is_oom(e):
                raise
            sets = None
            for c in fitting:
                rows[c.name]["skipped"] = f"could not allocate the parameters: {reason(e)}"
                if progress is not None:
                    progress.update(1)
        if sets is not None:
            loss = torch.tensor(2.0, device=device)
            for batch in batches:
                run_batch(batch, sets, loss, timer, policy, rows, progress)
        sets = None
        release(timer, collect=big)

    copy = rows.pop("copy")
    if copy["gbps"] is None:
        log(f"note: {case.name} {dtype}: no copy bandwidth ({copy['skipped']})")
    fused = rows.get("torch_fused")
    fused_ms = fused["median_ms"] if fused is not None else None
    out = []
    for c in contenders:
        row = rows[c.name]
        if copy["gbps"] is not None:
            row["copy_gbps"] = copy["gbps"]
            row["copy_ms"] = copy["median_ms"]
            if row["gbps"] is not None:
                row["pct_of_copy"] = 100.0 * row["gbps"] / copy["gbps"]
        if row["median_ms"] is not None and fused_ms:
            row["vs_torch_fused"] = row["median_ms"] / fused_ms
            row["speedup_vs_torch_fused"] = fused_ms / row["median_ms"]
        row["timer"] = timer.method
        out.append(row)
    return out


@dataclass
class BenchConfig:
    device: torch.device
    sizes: list[int]
    lists: list[str]
    dtypes: list[torch.dtype]
    quick: bool = False
    smoke: bool = False
    backends: list[str] | None = None  # None: all available
    modes: tuple = ("default",)  # AdamL's low-precision modes (modes.py) for fused backends
    budget_fraction: float | None = None  # of free memory; None: 0.4 on CPU, 0.85 on GPU
    progress: bool = True
    seed: int = 0


def build_cases(cfg: BenchConfig) -> list[Case]:
    return sweep_cases(cfg.sizes) + list_cases(cfg.lists, smoke=cfg.smoke)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        print("note: tqdm is not installed, so no progress bar (pip install tqdm)", file=sys.stderr)
        return None
    return tqdm(total=total, desc="adaml-bench", unit="run", file=sys.stderr, leave=False)


def run_benchmark(cfg: BenchConfig, log=None) -> tuple[list[dict], dict]:
    """Run every case for every dtype. Returns (rows, info): info has env, notes, the model."""
    device = cfg.device
    env = environment(device)
    contenders, notes = contenders_for(device, cfg.backends, cfg.modes)
    policy = make_policy(device, cfg.quick, cfg.smoke)
    timer = Timer(device)
    cache = last_level_cache_bytes(device)
    frac = cfg.budget_fraction or (0.85 if device.type == "cuda" else 0.4)
    cases = build_cases(cfg)
    total = len(cases) * sum(len([c for c in contenders if c.applies(dt)]) + 1
                             for dt in cfg.dtypes)
    bar = _progress_bar(total, cfg.progress)

    def _log(msg):
        (bar.write if bar is not None else print)(msg)

    log = log or _log
    rows = []
    try:
        for dtype in cfg.dtypes:
            for case in cases:
                if bar is not None:
                    bar.set_postfix_str(f"{case.name} {str(dtype)[6:]}")
                try:
                    t0, others = time.perf_counter(), OthersCpu()
                    case_rows = run_case(case, dtype, device, contenders, policy, timer, env,
                                         frac, cache, bar, log, cfg.seed)
                    others_pct = others.pct() if device.type == "cpu" else None
                    for row in case_rows:
                        row["case_wall_s"] = round(time.perf_counter() - t0, 2)
                        row["others_cpu_pct"] = others_pct
                    rows += case_rows
                except Exception as e:  # one broken case must not lose the others' numbers
                    log(f"error: {case.name} {dtype}: {reason(e)}")
                    for c in contenders:
                        if not c.applies(dtype):
                            continue
                        row = base_row(case, dtype, c, env)
                        row["skipped"] = f"the case failed: {reason(e)}"
                        rows.append(row)
                    release(timer, collect=True)
    finally:
        if bar is not None:
            bar.close()
    info = {"env": env, "notes": notes, "cache_bytes": cache, "budget_fraction": frac,
            "timer": timer.method, "contenders": [c.name for c in contenders]}
    return rows, info
