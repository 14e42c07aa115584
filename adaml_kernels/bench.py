"""adaml-bench: AdamL's backends against torch.optim.Adam (fused and foreach), side by side.

    adaml-bench [--device cpu|cuda] [--quick] [--sizes 1M,4M,16M] [--dtype float32,bfloat16]
                [--lists gpt2,many_small] [--json PATH] [--plot PATH] [--memory-check]
    python -m adaml_kernels.bench ...

Every available AdamL backend (the reference included) and torch.optim.Adam with fused=True and
with foreach=True step the same parameter tensors, case by case: a sweep of single-tensor sizes
and two realistic parameter lists (GPT-2 small: 148 tensors, 124M parameters; many small tensors:
5,000 tensors). For each case and optimizer it reports the time of the full ``opt.step`` call
(host overhead included), the bytes it moves under the traffic model below, the achieved GB/s,
that as a percentage of a device copy measured in the same run on buffers of the same traffic,
and its time relative to torch's fused Adam.

Traffic model (bytes per parameter and step; every array is read once and written once):
    AdamL          read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq.
                   Moments are float32 whatever the parameter dtype (float64 for float64), so
                   3 * param_bytes + 4 * 4:  float32 28 B, bfloat16/float16 22 B.
    torch Adam     the same arrays, with moments in the parameter dtype: 7 * param_bytes:
                   float32 28 B, bfloat16/float16 14 B.
The copy baseline, dst.copy_(src) on float32 buffers whose copy moves the bytes of an AdamL step
(read + write), is timed like the optimizers, interleaved with them. On a CPU a copy also reads
every destination line before writing it (read-for-ownership), which its byte count leaves out,
while an optimizer writes lines it has just read: there, an optimizer can exceed 100% of copy.

Timing: for each case, several independent sets of parameters and gradients are allocated (as
many as needed for the data stepped between two visits of a set to exceed twice the last-level
cache, within a memory budget) and every optimizer cycles through them, so the caches never hold
the previous step's data. After warm-up steps (which also build state and tables) each step is
timed on its own: CUDA events around a step that starts on an idle stream, or time.perf_counter
around the (synchronous) step on the CPU. The optimizers of a case are interleaved cycle by cycle
when their state fits in memory together, so drift of the machine hits them alike: in its turn,
each takes a few untimed steps (a cycle over the sets, or one step), since the first steps after
another optimizer's run slower (dirty cache lines to write back, and more), then a timed block
of at least 4 steps.

`run_benchmark` and `run_memory_check` are the programmatic entry points; `main` is the CLI.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import backends
from .buckets import moment_dtype
from .optimizer import AdamL

LR = 1e-3
ADAML_BACKENDS = backends.NAMES  # reference, triton, cpu, cuda
TORCH_CONTENDERS = ("torch_fused", "torch_foreach")
REQUIRED_KEYS = (
    "backend", "n_params", "n_tensors", "dtype", "median_ms", "gbps", "pct_of_copy",
    "vs_torch_fused",
)
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
_LIST_NAMES = ("gpt2", "many_small")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1 << 30}


# ---------------------------------------------------------------------------------- workloads


@dataclass
class Case:
    """One workload: the shapes of one model's parameters."""

    kind: str  # "sweep" (one tensor of a given size) or "list" (a realistic parameter list)
    name: str  # "1M", "gpt2_small", "many_small", ...
    shapes: list[tuple[int, ...]]

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def max_numel(self) -> int:
        return max(math.prod(s) for s in self.shapes)


def size_label(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def parse_size(text: str) -> int:
    """'1M' -> 2**20, '1B'/'1G' -> 2**30, '4096', '1e6' -> 1000000."""
    t = text.strip().upper().replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?)([KMGB]?)", t)
    if m:
        value = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        try:
            value = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 1M, 1e6)")
    n = int(round(value))
    if n < 1:
        raise argparse.ArgumentTypeError(f"size must be >= 1: {text!r}")
    return n


def gpt2_small_shapes(n_layer=12, d=768, vocab=50257, ctx=1024) -> list[tuple[int, ...]]:
    """GPT-2 small's parameters (Hugging Face layout, lm_head tied to wte): 148 tensors, 124M."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),  # ln_1
            (d, 3 * d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]
    return shapes + [(d,), (d,)]  # ln_f


def many_small_shapes(n=5000, seed=0) -> list[tuple[int, ...]]:
    """n small tensors, a deterministic mix like a deep conv net / many small layers:

    60% vectors (biases, norm weights) of 64..6144 elements (channel counts 2^k and 1.5 * 2^k),
    30% matrices of 16..128 x 16..256, 10% 3x3 conv kernels of 8..64 x 8..64 channels.
    With n=5000: 16,983,936 parameters, median tensor 1,536 elements.
    """
    rng = random.Random(seed)
    shapes: list[tuple[int, ...]] = []
    for i in range(n):
        r = i % 10
        if r < 6:
            shapes.append((int(2 ** rng.randint(6, 12) * rng.choice((1, 1.5))),))
        elif r < 9:
            shapes.append((rng.choice((16, 32, 64, 128)), rng.choice((16, 32, 64, 128, 256))))
        else:
            shapes.append((rng.choice((8, 16, 32, 64)), rng.choice((8, 16, 32, 64)), 3, 3))
    return shapes


def list_cases(names, smoke=False) -> list[Case]:
    cases = []
    for name in names:
        if name == "gpt2":
            shapes = gpt2_small_shapes(2, 32, 500, 64) if smoke else gpt2_small_shapes()
            cases.append(Case("list", "gpt2_small", shapes))
        elif name == "many_small":
            cases.append(Case("list", "many_small", many_small_shapes(100 if smoke else 5000)))
        else:
            raise ValueError(f"unknown list {name!r}; choose from {_LIST_NAMES}")
    return cases


# -------------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    name: str  # the JSON `backend`: reference, triton, cpu, cuda, torch_fused, torch_foreach
    family: str  # "adaml", "torch" or "copy"
    make: Callable  # params -> optimizer
    step: Callable  # (optimizer, loss) -> None

    def bytes_per_param(self, dtype: torch.dtype) -> int:
        return traffic_per_param(self.family, dtype)

    def state_bytes(self, case: Case, dtype: torch.dtype) -> int:
        """Optimizer state of one set of parameters."""
        if self.family == "copy":  # source and destination, traffic / 2 bytes each
            return traffic_per_param("adaml", dtype) * case.n_params + 64
        if self.family == "adaml":
            ms = _elem(moment_dtype(dtype))
            return 2 * ms * case.n_params + 2 * 64 * case.n_tensors + 16 * case.n_tensors
        return 2 * _elem(dtype) * case.n_params + 8 * case.n_tensors

    def scratch_bytes(self, case: Case, dtype: torch.dtype) -> int:
        """A generous estimate of what one step allocates on top of the state."""
        cs = _elem(moment_dtype(dtype))
        if self.name == "reference":  # one tensor at a time, a dozen temporaries
            return 12 * cs * case.max_numel
        if self.name == "torch_foreach":  # e.g. the sqrt of every exp_avg_sq at once
            return 3 * _elem(dtype) * case.n_params
        return 64 * case.n_tensors + (1 << 20)


def traffic_per_param(family: str, dtype: torch.dtype) -> int:
    ps = _elem(dtype)
    if family in ("adaml", "copy"):
        return 3 * ps + 4 * _elem(moment_dtype(dtype))
    return 7 * ps


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _copy_buffers(params):
    """float32 source and destination whose copy moves what an AdamL step on `params` moves."""
    traffic = traffic_per_param("adaml", params[0].dtype) * sum(p.numel() for p in params)
    n = max(1, traffic // 8)
    src = torch.empty(n, device=params[0].device)
    src.fill_(1.5)
    return src, torch.empty_like(src)


def _copy_step(buffers, _loss) -> None:
    src, dst = buffers
    dst.copy_(src)


# The copy baseline is timed like an optimizer, interleaved with them: bytes = read + write.
COPY = Contender("copy", "copy", _copy_buffers, _copy_step)


def _adaml(name: str) -> Contender:
    return Contender(
        name, "adaml", lambda ps: AdamL(ps, lr=LR, backend=name), lambda opt, loss: opt.step(loss)
    )


def _torch_adam(name: str) -> Contender:
    kw = {"fused": True} if name == "torch_fused" else {"foreach": True}
    return Contender(
        name, "torch", lambda ps: torch.optim.Adam(ps, lr=LR, **kw), lambda opt, loss: opt.step()
    )


def contenders_for(device: torch.device, wanted=None) -> tuple[list[Contender], list[str]]:
    """The optimizers to measure on `device`, and notes on the AdamL backends left out."""
    notes = []
    available = backends.available_backends(device)
    chosen = []
    for name in ADAML_BACKENDS:
        if wanted is not None and name not in wanted:
            continue
        if name == "triton" and device.type == "cpu":
            if name in available:
                notes.append("triton: skipped on the CPU (TRITON_INTERPRET=1 is an interpreter)")
            continue
        if name in available:
            chosen.append(_adaml(name))
        else:
            reason = backends.unavailable_reason(name, device)
            if device.type in backends.INFO[name].device_types:
                notes.append(f"{name}: unavailable ({reason})")
    for name in TORCH_CONTENDERS:
        if wanted is None or name in wanted:
            chosen.append(_torch_adam(name))
    return chosen, notes


def _supports(c: Contender, dtype: torch.dtype) -> str | None:
    if c.family == "adaml":
        dtypes = backends.INFO[c.name].dtypes
        if dtypes is not None and dtype not in dtypes:
            return f"backend {c.name!r} does not support {dtype}"
    return None


# ---------------------------------------------------------------------------------- machine


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or (64 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                best = max(best, int(m.group(1)) * _SIZE_UNITS[m.group(2)])
    except OSError:
        pass
    return best or (32 << 20)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": _loadavg(),
        "cpu_busy_pct_at_start": _cpu_busy_pct() if device.type == "cpu" else None,
    }


def _cpu_busy_pct(interval=0.3) -> float | None:
    """Percentage of all CPUs' time spent busy over `interval` (Linux /proc/stat), else None."""

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return None if t1 == t0 else round(100.0 * (1 - (i1 - i0) / (t1 - t0)), 1)


class OthersCpu:
    """The share of all CPUs that other processes used between two snapshots (Linux only)."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)
            t = os.times()
            return busy / os.sysconf("SC_CLK_TCK"), time.monotonic(), t.user + t.system
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def pct(self) -> float | None:
        """Percent of all CPUs busy with other processes since the snapshot taken at creation."""
        end = self._snapshot()
        if self.start is None or end is None or end[1] - self.start[1] < 0.05:
            return None
        others = (end[0] - self.start[0]) - (end[2] - self.start[2])
        share = others / ((end[1] - self.start[1]) * (os.cpu_count() or 1))
        return round(min(max(100.0 * share, 0.0), 100.0), 1)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------- timing


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


def default_sizes(device: torch.device, quick: bool) -> list[int]:
    M = 1 << 20
    if device.type == "cuda":
        return [M, 16 * M, 256 * M] if quick else [M, 4 * M, 16 * M, 64 * M, 256 * M, 1024 * M]
    return [M, 4 * M, 16 * M] if quick else [M, 2 * M, 4 * M, 8 * M, 16 * M, 32 * M, 64 * M]


def rotation_sets(step_bytes: int, cache_bytes: int, max_sets: int) -> int:
    """Sets to cycle so that > 2x the cache is touched between two visits of one set.

    One set is enough once a single step touches 4x the cache: it evicts its own data.
    """
    if step_bytes >= 4 * cache_bytes:
        return 1
    return max(2, min(max_sets, 1 + math.ceil(2 * cache_bytes / max(step_bytes, 1))))


def _stats(seconds: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "reps": int(ms.size),
    }


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate" in text or (
        "not enough memory" in text)


def _reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


# --------------------------------------------------------------------------- parameter sets


class _Filler:
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


def make_set(case: Case, dtype: torch.dtype, device: torch.device, filler: _Filler):
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


# ------------------------------------------------------------------------------ measurement


def _base_row(case: Case, dtype: torch.dtype, c: Contender, env: dict) -> dict:
    bpp = c.bytes_per_param(dtype)
    return {
        "case": case.name,
        "kind": case.kind,
        "backend": c.name,
        "optimizer": "AdamL" if c.family == "adaml" else "torch.optim.Adam",
        "n_params": case.n_params,
        "n_tensors": case.n_tensors,
        "dtype": str(dtype).replace("torch.", ""),
        "bytes_per_param": bpp,
        "bytes_moved": bpp * case.n_params,
        "device": env["device"],
        "device_name": env["device_name"],
        "torch_version": env["torch_version"],
        "triton_version": env["triton_version"],
        "threads": env["threads"],
        "cpu_busy_pct_at_start": env["cpu_busy_pct_at_start"],
        "median_ms": None, "p10_ms": None, "p90_ms": None, "min_ms": None, "host_ms": None,
        "reps": 0, "sets": 0, "gbps": None, "copy_gbps": None, "pct_of_copy": None,
        "vs_torch_fused": None, "speedup_vs_torch_fused": None, "skipped": None,
    }


def _run_batch(batch, sets, loss, timer: Timer, policy: Policy, rows: dict, progress) -> None:
    """Warm up, then time `batch`'s optimizers cycle by cycle, interleaved. Fills rows[c.name]."""
    k = len(sets)
    order = list(range(1, k)) + [0]  # the warm-up ends on set 0: start the cycles elsewhere
    opts, reps, times, hosts = {}, {}, {}, {}
    for c in batch:
        try:
            opts[c.name] = [c.make(ps) for ps in sets]
            for s in range(k):
                c.step(opts[c.name][s], loss)
            timer.sync()
            est, _ = timer.time(lambda: c.step(opts[c.name][0], loss))
            reps[c.name] = policy.reps(est, k, reference=c.name == "reference")
            times[c.name], hosts[c.name] = [], []
        except Exception as e:
            rows[c.name]["skipped"] = _reason(e)
            opts.pop(c.name, None)
            _free(timer, collect=True)
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
                    c.step(opt_list[s], loss)
                n_timed = min(block, reps[c.name] - len(times[c.name]))
                for i in range(n_timed):
                    s = order[i % k]
                    t, h = timer.time(lambda: c.step(opt_list[s], loss))
                    times[c.name].append(t)
                    hosts[c.name].append(h)
            except Exception as e:
                rows[c.name]["skipped"] = _reason(e)
                reps[c.name] = 0
        active = [c for c in active if len(times[c.name]) < reps[c.name]]
    for c in batch:
        row = rows[c.name]
        if row["skipped"] is None and times.get(c.name):
            st = _stats(times[c.name])
            row.update(st)
            row["host_ms"] = _stats(hosts[c.name])["median_ms"]
            row["sets"] = k
            row["gbps"] = row["bytes_moved"] / (st["median_ms"] / 1e3) / 1e9
        if progress is not None:
            progress.update(1)
    opts.clear()
    _free(timer, collect=_big(sets))


def _big(sets) -> bool:
    return sum(p.numel() * p.element_size() for ps in sets for p in ps) > (256 << 20)


def _free(timer: Timer, collect: bool = True) -> None:
    """Give memory back (tensors die by reference counting; gc.collect only for big cases)."""
    if collect:
        gc.collect()
    if timer.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_case(case, dtype, device, contenders, policy, timer, env, budget_fraction,
             cache_bytes, progress=None, log=print, seed=0) -> list[dict]:
    """Measure every contender on `case`; one row each (skipped rows carry the reason)."""
    rows = {c.name: _base_row(case, dtype, c, env) for c in contenders}
    todo = []
    for c in contenders:
        why = _supports(c, dtype)
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
    rows["copy"] = _base_row(case, dtype, COPY, env)
    adaml_traffic = traffic_per_param("adaml", dtype) * case.n_params
    big = adaml_traffic > (512 << 20)

    # As many rotation sets as the cache asks for and the memory budget allows, for everyone.
    budget = int(budget_fraction * free_memory_bytes(device))
    set_bytes = 2 * _elem(dtype) * case.n_params + 1024 * case.n_tensors
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
            filler = _Filler(device, seed)
            sets = [make_set(case, dtype, device, filler) for _ in range(k)]
        except Exception as e:
            if not _is_oom(e):
                raise
            sets = None
            for c in fitting:
                rows[c.name]["skipped"] = f"could not allocate the parameters: {_reason(e)}"
                if progress is not None:
                    progress.update(1)
        if sets is not None:
            loss = torch.tensor(2.0, device=device)
            for batch in batches:
                _run_batch(batch, sets, loss, timer, policy, rows, progress)
        sets = None
        _free(timer, collect=big)

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
    budget_fraction: float | None = None  # of free memory; None: 0.4 on CPU, 0.85 on GPU
    progress: bool = True
    seed: int = 0


def build_cases(cfg: BenchConfig) -> list[Case]:
    cases = [Case("sweep", size_label(n), [(n,)]) for n in cfg.sizes]
    return cases + list_cases(cfg.lists, smoke=cfg.smoke)


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
    contenders, notes = contenders_for(device, cfg.backends)
    policy = make_policy(device, cfg.quick, cfg.smoke)
    timer = Timer(device)
    cache = last_level_cache_bytes(device)
    frac = cfg.budget_fraction or (0.85 if device.type == "cuda" else 0.4)
    cases = build_cases(cfg)
    total = len(cases) * len(cfg.dtypes) * (len(contenders) + 1)
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
                    log(f"error: {case.name} {dtype}: {_reason(e)}")
                    for c in contenders:
                        row = _base_row(case, dtype, c, env)
                        row["skipped"] = f"the case failed: {_reason(e)}"
                        rows.append(row)
                    _free(timer, collect=True)
    finally:
        if bar is not None:
            bar.close()
    info = {"env": env, "notes": notes, "cache_bytes": cache, "budget_fraction": frac,
            "timer": timer.method, "contenders": [c.name for c in contenders]}
    return rows, info


# ---------------------------------------------------------------------------- memory check


def run_memory_check(device: torch.device, cases: list[Case], dtype: torch.dtype,
                     wanted=None, log=print) -> list[dict]:
    """Peak memory one ``opt.step`` allocates beyond what was allocated before it (CUDA only).

    Per case and optimizer: one set of parameters, two warm-up steps (state and tables built),
    then reset_peak_memory_stats, one step, and extra = max_memory_allocated - allocated before.
    """
    if device.type != "cuda":
        raise RuntimeError("the memory check needs a CUDA device (--device cuda)")
    env = environment(device)
    contenders, _ = contenders_for(device, wanted)
    rows = []
    loss = torch.tensor(2.0, device=device)
    for case in cases:
        filler = _Filler(device, 0)
        try:
            params = make_set(case, dtype, device, filler)
        except Exception as e:
            log(f"note: memory check {case.name}: cannot allocate the parameters ({_reason(e)})")
            continue
        for c in contenders:
            row = {"case": case.name, "backend": c.name, "n_params": case.n_params,
                   "n_tensors": case.n_tensors, "dtype": str(dtype).replace("torch.", ""),
                   "device_name": env["device_name"], "state_bytes": None,
                   "extra_peak_bytes": None, "skipped": _supports(c, dtype)}
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
                    row["skipped"] = _reason(e)
                opt = None
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
        params = None
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def format_memory_table(rows: list[dict]) -> str:
    head = f"{'case':<12} {'backend':<14} {'params':>13} {'tensors':>7} {'dtype':<9} " \
           f"{'state MB':>10} {'extra peak bytes':>17}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["skipped"]:
            tail = f"  skipped: {r['skipped']}"
            lines.append(f"{r['case']:<12} {r['backend']:<14} {r['n_params']:>13,} "
                         f"{r['n_tensors']:>7} {r['dtype']:<9}{tail}")
        else:
            lines.append(f"{r['case']:<12} {r['backend']:<14} {r['n_params']:>13,} "
                         f"{r['n_tensors']:>7} {r['dtype']:<9} {r['state_bytes'] / 2**20:>10.1f} "
                         f"{r['extra_peak_bytes']:>17,}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- reporting


def traffic_model_text(dtypes) -> str:
    parts = []
    for dt in dtypes:
        name = str(dt).replace("torch.", "")
        a, t = traffic_per_param("adaml", dt), traffic_per_param("torch", dt)
        ps = _elem(dt)
        ms = _elem(moment_dtype(dt))
        parts.append(
            f"  {name}: AdamL {a} B/param (read {ps}+{ps}+{ms}+{ms}, write {ps}+{ms}+{ms}; "
            f"moments {str(moment_dtype(dt))[6:]}); torch Adam {t} B/param (moments {name})")
    return "\n".join(parts)


def _fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    head = (f"{'case':<11} {'backend':<14} {'params':>13} {'tensors':>7} {'dtype':<8} "
            f"{'B/p':>3} {'median ms':>10} {'p10-p90 ms':>19} {'host ms':>9} {'GB/s':>7} "
            f"{'%copy':>6} {'x fused':>7} {'sets':>4} {'reps':>4}")
    lines = [head, "-" * len(head)]
    previous = None
    for r in rows:
        key = (r["case"], r["dtype"])
        if previous is not None and key != previous:
            lines.append("")
        if key != previous:
            lines.append(f"# {r['case']}, {r['dtype']}: copy {_fmt(r['copy_gbps'], '.1f')} GB/s")
        previous = key
        left = (f"{r['case']:<11} {r['backend']:<14} {r['n_params']:>13,} {r['n_tensors']:>7} "
                f"{r['dtype']:<8} {r['bytes_per_param']:>3}")
        if r["skipped"]:
            lines.append(f"{left}  skipped: {r['skipped']}")
            continue
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        lines.append(
            f"{left} {r['median_ms']:>10.3f} {spread:>19} {r['host_ms']:>9.3f} "
            f"{r['gbps']:>7.2f} {_fmt(r['pct_of_copy'], '.1f'):>6} "
            f"{_fmt(r['vs_torch_fused'], '.3f'):>7} {r['sets']:>4} {r['reps']:>4}")
    return "\n".join(lines)


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


def write_plot(rows: list[dict], path: str, title: str) -> str | None:
    """GB/s against parameters, one line per backend (the copy too). Returns a note if skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed, so no plot (pip install matplotlib)"
    done = [r for r in rows if r["gbps"] is not None]
    dtypes = sorted({r["dtype"] for r in done}) or ["float32"]
    fig = Figure(figsize=(7.5 * len(dtypes), 5.2))
    FigureCanvasAgg(fig)
    markers = {"gpt2_small": "s", "many_small": "^"}
    for i, dt in enumerate(dtypes):
        ax = fig.add_subplot(1, len(dtypes), i + 1)
        colors = {}
        sweep_copy = sorted({(r["n_params"], r["copy_gbps"]) for r in rows if r["kind"] == "sweep"
                             and r["dtype"] == dt and r["copy_gbps"] is not None})
        if sweep_copy:
            ax.plot(*zip(*sweep_copy), "k--", label="copy (read+write)")
        for backend in dict.fromkeys(r["backend"] for r in done if r["dtype"] == dt):
            pts = sorted((r["n_params"], r["gbps"]) for r in done
                         if r["dtype"] == dt and r["backend"] == backend and r["kind"] == "sweep")
            if pts:
                (line,) = ax.plot(*zip(*pts), "o-", label=backend)
                colors[backend] = line.get_color()
        for r in done:
            if r["dtype"] == dt and r["kind"] == "list":
                color = colors.get(r["backend"])
                if color is None:
                    (line,) = ax.plot([], [], "o-", label=r["backend"])
                    color = colors[r["backend"]] = line.get_color()
                ax.scatter([r["n_params"]], [r["gbps"]], marker=markers.get(r["case"], "D"),
                           color=color, s=50, edgecolors="black", linewidths=0.5, zorder=3)
        for case, m in markers.items():
            if any(r["case"] == case and r["dtype"] == dt for r in done):
                ax.scatter([], [], marker=m, color="white", edgecolors="black", label=case)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: size_label(int(round(x)))))
        ys = [r["gbps"] for r in done if r["dtype"] == dt] + [c for _n, c in sweep_copy]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 30:
            ax.set_yscale("log")
        ax.set_xlabel("parameters (log scale); lists: markers")
        ax.set_ylabel("GB/s under the traffic model")
        ax.set_title(f"{title}, {dt}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def _write_json(path: str, rows: list[dict]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


# -------------------------------------------------------------------------------------- CLI


def _parse_list(text: str, allowed, what: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in allowed:
            raise argparse.ArgumentTypeError(f"unknown {what} {t!r}; choose from {allowed}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaml-bench",
        description="Time AdamL's backends against torch.optim.Adam (fused, foreach): full "
                    "opt.step time, GB/s under the traffic model, % of a copy measured in the "
                    "same run, and the time relative to torch's fused Adam.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when there is one, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes and repetitions (CPU: 1M, 4M, 16M and both lists, < 2 min)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated single-tensor sizes, e.g. 1M,4M,16M (K/M/G = 2^10/20/30, "
                        "1B = 2^30), or 'none'. Default: 1M-64M on the CPU, 1M-1B on the GPU")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated parameter dtypes: float32, bfloat16, float16, float64")
    p.add_argument("--lists", default="gpt2,many_small",
                   help="parameter lists to run: gpt2, many_small, or 'none'")
    p.add_argument("--backends", default=None,
                   help="only these optimizers (comma-separated): reference, triton, cpu, cuda, "
                        "torch_fused, torch_foreach. Default: every available one")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against size")
    p.add_argument("--memory-check", action="store_true",
                   help="CUDA only: instead of timing, report the peak memory one opt.step "
                        "allocates beyond the state, per optimizer (default cases: 16M, 256M "
                        "and both lists)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="FRACTION",
                   help="fraction of free memory the benchmark may use (default 0.4 CPU, 0.85 GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the kernels (torch.set_num_threads); "
                        "default: torch's default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny, for tests
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        dtypes = []
        for t in _parse_list(args.dtype, tuple(_DTYPES), "dtype"):
            if _DTYPES[t] not in dtypes:
                dtypes.append(_DTYPES[t])
        lists = _parse_list(args.lists, _LIST_NAMES, "list")
        wanted = None if args.backends is None else _parse_list(
            args.backends, ADAML_BACKENDS + TORCH_CONTENDERS, "backend")
        if args.sizes is not None:
            sizes = [] if args.sizes.strip().lower() == "none" else [
                parse_size(s) for s in args.sizes.split(",") if s.strip()]
        elif args.smoke:
            sizes = [1000, 4096]
        elif args.memory_check:
            sizes = [16 << 20, 256 << 20]
        else:
            sizes = default_sizes(device, args.quick)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if not dtypes:
        parser.error("--dtype: give at least one dtype")

    t_start = time.perf_counter()
    if args.memory_check:
        if device.type != "cuda":
            print("adaml-bench --memory-check needs a CUDA device (--device cuda); "
                  "torch does not track peak CPU allocations", file=sys.stderr)
            return 2
        cases = [Case("sweep", size_label(n), [(n,)]) for n in sizes] + list_cases(
            lists, smoke=args.smoke)
        rows = []
        for dt in dtypes:
            rows += run_memory_check(device, cases, dt, wanted)
        env = environment(device)
        print(f"adaml-bench memory check on {env['device_name']} (torch {env['torch_version']}, "
              f"triton {env['triton_version']})")
        print("extra peak bytes: max_memory_allocated during one opt.step (after 2 warm-up steps)"
              " minus memory_allocated before it; state MB: what the optimizer allocated.")
        print(format_memory_table(rows))
        if args.json:
            _write_json(args.json, rows)
            print(f"wrote {args.json}")
        return 0

    cfg = BenchConfig(device, sizes, lists, dtypes, quick=args.quick, smoke=args.smoke,
                      backends=wanted, budget_fraction=args.memory_budget,
                      progress=not args.no_progress)
    if not cfg.sizes and not cfg.lists:
        parser.error("nothing to run: --sizes none and --lists none")
    gc.collect()
    gc.freeze()  # what is alive now stays: full collections during timing get cheap
    try:
        rows, info = run_benchmark(cfg)
    finally:
        gc.unfreeze()
    env = info["env"]
    elapsed = time.perf_counter() - t_start
    print(f"adaml-bench on {env['device']} ({env['device_name']}, {env['threads']} threads), "
          f"torch {env['torch_version']}, triton {env['triton_version']}, "
          f"Python {env['python_version']}{', quick' if args.quick else ''}")
    print("Traffic model, bytes per parameter and step (each array read once, written once):")
    print(traffic_model_text(dtypes))
    print(f"Timer: {info['timer']} around each full opt.step (host overhead included), after "
          "warm-up; median and p10-p90 of the timed steps; optimizers and copy interleaved in "
          "turns, each turn led by untimed steps. sets: input sets cycled so the "
          f"{info['cache_bytes'] / 2**20:.0f} MiB last-level cache never holds the previous "
          "step's data.")
    print("GB/s = bytes moved / median time; %copy = GB/s / copy GB/s (read+write bytes of "
          "dst.copy_(src) on buffers of the same traffic, this run); x fused = time / torch "
          "fused Adam's time (< 1: faster); host ms = time in the Python call.")
    if device.type == "cpu":
        print("On a CPU a copy also reads each destination line before writing it (uncounted), "
              "so an in-place optimizer step can exceed 100% of copy.")
    busy = env.get("cpu_busy_pct_at_start")
    if busy is not None and busy > 25:
        print(f"WARNING: other processes kept {busy:.0f}% of the CPUs busy when the run started "
              f"(load average {env['loadavg_1min']}); CPU timings are unreliable on a busy box.")
    noisy = {r["case"]: r["others_cpu_pct"] for r in rows
             if (r.get("others_cpu_pct") or 0) > 10}
    if noisy:
        print("WARNING: other processes used a share of the CPUs while these cases ran, so "
              "their times are unreliable: " + ", ".join(f"{c} {p:.0f}%" for c, p in noisy.items()))
    for note in info["notes"]:
        print(f"note: {note}")
    print()
    print(format_table(rows))
    print()
    print("Goals:")
    for line in goal_lines(rows, device):
        print(f"  {line}")
    if args.json:
        _write_json(args.json, rows)
        print(f"wrote {args.json}")
    if args.plot:
        title = f"AdamL vs torch Adam on {env['device_name']}"
        note = write_plot(rows, args.plot, title)
        print(f"note: {note}" if note else f"wrote {args.plot}")
    print(f"done in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
