"""One optimizer step on the CPU: AdamL's C++ kernel against torch.optim.Adam and the reference.

    python benchmarks/bench_cpu_step.py                  # 16M and 64M float32 params
    python benchmarks/bench_cpu_step.py --sizes 1M 16M --repeats 9 --threads 2

For each size, two layouts of the same number of float32 parameters: one tensor, and a list of
tensors of mixed sizes. All contenders step the same parameter and gradient tensors (each with
its own optimizer state), in one process, interleaved round by round (the order rotates each
round); the figure is the median of the timed rounds after warm-up. GB/s counts 28 bytes per
parameter: read p, g, m, w and write p, m, w in float32, what one fused pass must move.

Targets (issue 3): cpu step <= 1.05x torch.optim.Adam(fused=True), and >= 5x faster than the
reference backend.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import adaml_kernels
from adaml_kernels import AdamL

BYTES_PER_PARAM = 28


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def list_shapes(total: int) -> list[int]:
    """Tensors of mixed sizes (large matrices, mid-size, biases) adding up to `total`."""
    sizes, pattern, i = [], [0.10, 0.05, 0.02, 0.01, 0.002], 0
    remaining = total
    while remaining > 0:
        n = min(remaining, max(1, int(total * pattern[i % len(pattern)])) + 37 * (i % 7))
        sizes.append(n)
        remaining -= n
        i += 1
        if i % 5 == 0 and remaining > 0:  # a bias vector every few tensors
            b = min(remaining, 1000 + 17 * i)
            sizes.append(b)
            remaining -= b
    return sizes


def contenders(params):
    loss = torch.tensor(1.5)
    out = {}
    cpu = AdamL(params, lr=1e-4, backend="cpu")
    out["adaml cpu"] = lambda: cpu.step(loss)
    fused = torch.optim.Adam(params, lr=1e-4, fused=True)
    out["adam fused"] = fused.step
    foreach = torch.optim.Adam(params, lr=1e-4, foreach=True)
    out["adam foreach"] = foreach.step
    ref = AdamL(params, lr=1e-4, backend="reference")
    out["adaml reference"] = lambda: ref.step(loss)
    return out


def bench_case(name: str, sizes: list[int], warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    params = [torch.randn(n, requires_grad=True) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    steps = contenders(params)
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for r in range(repeats):
        # Interleaved, and the order rotates each round: no contender always follows the
        # reference, whose large temporaries disturb the next step.
        for key in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t0)
    n = sum(sizes)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{name}: {n / 2**20:.0f}M float32 params in {len(sizes)} tensor(s)")
    print(f"  {'contender':<16} {'median ms':>10} {'min ms':>9} {'GB/s':>7}")
    for k, t in med.items():
        gbs = BYTES_PER_PARAM * n / t / 1e9
        print(f"  {k:<16} {t * 1e3:10.2f} {min(times[k]) * 1e3:9.2f} {gbs:7.2f}")
    vs_fused = med["adaml cpu"] / med["adam fused"]
    speedup = med["adaml reference"] / med["adaml cpu"]
    ok = vs_fused <= 1.05 and speedup >= 5
    print(f"  adaml cpu / adam fused     = {vs_fused:.3f}x   (target <= 1.05)")
    print(f"  adaml reference / adaml cpu = {speedup:.1f}x   (target >= 5)   "
          f"{'OK' if ok else 'MISSED'}")
    return {"case": name, "n": n, "median_s": med, "vs_fused": vs_fused, "speedup": speedup,
            "ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["16M", "64M"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from adaml_kernels import _extension

    if "cpu" not in adaml_kernels.available_backends("cpu"):
        raise SystemExit(f"the cpu backend is not available: {_extension.load_error}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu kernel ISA: {_extension.cpu_capability()}")
    results = []
    for size in args.sizes:
        n = parse_size(size)
        results.append(bench_case(f"{size} one tensor", [n], args.warmup, args.repeats))
        results.append(bench_case(f"{size} list", list_shapes(n), args.warmup, args.repeats))
    print("\nsummary:")
    for r in results:
        print(f"  {r['case']:<18} cpu/fused {r['vs_fused']:.3f}x  ref/cpu {r['speedup']:.1f}x  "
              f"{'OK' if r['ok'] else 'MISSED'}")


if __name__ == "__main__":
    main()
