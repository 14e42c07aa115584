"""Peak RSS of a training step with gradient release, the ordinary AdamL step and torch fused
Adam, each in a fresh process (CPU; Linux: /proc/self/status).

    python benchmarks/gradient_release_memory.py [--layers 24] [--width 2048] [--cap-mb 25]

The model: LAYERS x nn.Linear(WIDTH, WIDTH), float32 (24 x 2048: 100.7M parameters, 403 MB),
a batch of 32 and an MSE loss. Each process builds the model and its optimizer, takes 2 warm-up
steps (the state exists), then resets VmHWM (/proc/self/clear_refs) and takes steps 3-5
(forward, backward, step, zero_grad). Reported: that peak minus the RSS just before step 3
(parameters, state, no gradients), and minus the RSS after building the model (before the
optimizer existed: its state, the gradients, the activations and what the allocator keeps), in
MiB. The second is the one to compare: freed gradients the C allocator keeps count in "before".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

OPTIMIZERS = ("adaml_release", "adaml", "torch_fused")
MB = float(1 << 20)
TAG = "RESULT "


def worker(name: str, layers: int, width: int, cap_mb: float) -> dict:
    import gc

    import torch

    from adaml_kernels import AdamL
    from adaml_kernels.bench.memory_cpu import hwm_bytes, reset_hwm, rss_bytes

    torch.manual_seed(0)
    start = rss_bytes()
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    params = list(model.parameters())
    x, y = torch.randn(32, width), torch.randn(32, width)
    gc.collect()
    model_rss = rss_bytes()
    if name == "torch_fused":
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    elif name == "adaml":
        opt = AdamL(params, lr=1e-3, backend="cpu")
    else:
        opt = AdamL(params, lr=1e-3, backend="cpu", gradient_release=True, bucket_cap_mb=cap_mb)

    def step():
        loss = torch.nn.functional.mse_loss(model(x), y)
        if name == "adaml_release":
            opt.add_loss(loss)
            loss.backward()
            opt.step()
        else:
            loss.backward()
            opt.step() if name == "torch_fused" else opt.step(loss)
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    gc.collect()
    before = rss_bytes()
    reset = reset_hwm()
    for _ in range(3):
        step()
    return {"optimizer": name, "start": start, "model": model_rss, "before": before, "peak": hwm_bytes(), "hwm_reset": reset,
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "n_params": sum(p.numel() for p in params),
            "buckets": len(opt.engine.release.buckets) if name == "adaml_release" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--cap-mb", type=float, default=25.0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(TAG + json.dumps(worker(args.worker, args.layers, args.width, args.cap_mb)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root] + [v for v in [os.environ.get("PYTHONPATH")] if v])}
    rows = []
    for name in OPTIMIZERS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name,
                              "--layers", str(args.layers), "--width", str(args.width),
                              "--cap-mb", str(args.cap_mb)],
                             capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(next(l for l in out.splitlines() if l.startswith(TAG))[len(TAG):]))
    grads = rows[0]["param_bytes"]
    print(f"model: {args.layers} x nn.Linear({args.width}, {args.width}), "
          f"{rows[0]['n_params']:,} float32 parameters, gradients {grads / MB:.1f} MiB; "
          f"gradient release: bucket_cap_mb {args.cap_mb}, {rows[0]['buckets']} buckets")
    print(f"{'optimizer':<14} {'peak - model (MiB)':>19} {'peak - before (MiB)':>20} "
          f"{'model (MiB)':>12}")
    for r in rows:
        print(f"{r['optimizer']:<14} {(r['peak'] - r['model']) / MB:>19.1f} "
              f"{(r['peak'] - r['before']) / MB:>20.1f} {r['model'] / MB:>12.1f}"
              + ("" if r["hwm_reset"] else "  (VmHWM not reset)"))
    saved = (rows[1]["peak"] - rows[1]["model"]) - (rows[0]["peak"] - rows[0]["model"])
    print(f"gradient release lowers the ordinary AdamL step's peak by {saved / MB:.1f} MiB = "
          f"{saved / grads:.0%} of the gradient bytes (goal: >= 80%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
