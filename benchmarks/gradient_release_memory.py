"""Peak memory of a training step with gradient release, the ordinary AdamL step and torch fused
Adam, each in a fresh process: peak RSS on the CPU (Linux: /proc/self/status), or
torch.cuda.max_memory_allocated on a GPU.

    python benchmarks/gradient_release_memory.py [--layers 24] [--width 2048] [--cap-mb 25]
    python benchmarks/gradient_release_memory.py --device cuda        # AdamL's cuda backend

The model: LAYERS x nn.Linear(WIDTH, WIDTH), float32 (24 x 2048: 100.7M parameters, 403 MB),
a batch of 32 and an MSE loss. Each process builds the model and its optimizer, takes 2 warm-up
steps (the state exists), then resets VmHWM (/proc/self/clear_refs) and takes steps 3-5
(forward, backward, step, zero_grad). Reported: that peak minus the RSS just before step 3
(parameters, state, no gradients), and minus the RSS after building the model (before the
optimizer existed: its state, the gradients, the activations and what the allocator keeps), in
MiB. The second is the one to compare: freed gradients the C allocator keeps count in "before".

With --device cuda the same steps run on the GPU (AdamL's backend: --backend, default cuda) and
the figures are the caching allocator's bytes in live tensors instead of RSS:
torch.cuda.memory_allocated for the "model" and "before" points, and for the peak
torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats() at the same point,
synchronised. Freed blocks the allocator keeps cached do not count there, so no glibc effect.
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


class HostMemory:
    """The process's RSS and its peak (VmHWM), which reset() sets to the current RSS."""

    def __init__(self, device):
        from adaml_kernels.bench.memory_cpu import hwm_bytes, reset_hwm, rss_bytes

        self.current, self.peak, self._reset = rss_bytes, hwm_bytes, reset_hwm

    def reset(self) -> bool:
        return self._reset()


class CudaMemory:
    """Bytes in live tensors on the GPU (the caching allocator's count) and their peak."""

    def __init__(self, device):
        import torch

        self.cuda, self.device = torch.cuda, device

    def current(self) -> int:
        self.cuda.synchronize(self.device)
        return self.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        self.cuda.synchronize(self.device)
        return self.cuda.max_memory_allocated(self.device)

    def reset(self) -> bool:
        self.cuda.synchronize(self.device)
        self.cuda.reset_peak_memory_stats(self.device)
        return True


def worker(name: str, layers: int, width: int, cap_mb: float, device: str = "cpu",
           backend: str = "cpu") -> dict:
    import gc

    import torch

    from adaml_kernels import AdamL

    device = torch.device(device)
    memory = (CudaMemory if device.type == "cuda" else HostMemory)(device)
    torch.manual_seed(0)
    start = memory.current()
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    model.to(device)
    params = list(model.parameters())
    x, y = torch.randn(32, width, device=device), torch.randn(32, width, device=device)
    gc.collect()
    model_rss = memory.current()
    if name == "torch_fused":
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    elif name == "adaml":
        opt = AdamL(params, lr=1e-3, backend=backend)
    else:
        opt = AdamL(params, lr=1e-3, backend=backend, gradient_release=True,
                    bucket_cap_mb=cap_mb)

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
    before = memory.current()
    reset = memory.reset()
    for _ in range(3):
        step()
    return {"optimizer": name, "start": start, "model": model_rss, "before": before,
            "peak": memory.peak(), "hwm_reset": reset, "device": str(device),
            "backend": None if name == "torch_fused" else backend,
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "n_params": sum(p.numel() for p in params),
            "buckets": len(opt.engine.release.buckets) if name == "adaml_release" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--cap-mb", type=float, default=25.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", default=None,
                   help="AdamL's backend (default: cpu on the CPU, cuda on a GPU)")
    p.add_argument("--json", metavar="FILE", help="also write the rows to FILE")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    backend = args.backend or args.device
    if args.worker:
        print(TAG + json.dumps(worker(args.worker, args.layers, args.width, args.cap_mb,
                                      args.device, backend)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root] + [v for v in [os.environ.get("PYTHONPATH")] if v])}
    rows = []
    for name in OPTIMIZERS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name,
                              "--layers", str(args.layers), "--width", str(args.width),
                              "--cap-mb", str(args.cap_mb), "--device", args.device,
                              "--backend", backend],
                             capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(next(l for l in out.splitlines() if l.startswith(TAG))[len(TAG):]))
    grads = rows[0]["param_bytes"]
    measure = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS"
    print(f"model: {args.layers} x nn.Linear({args.width}, {args.width}), "
          f"{rows[0]['n_params']:,} float32 parameters, gradients {grads / MB:.1f} MiB; "
          f"gradient release: bucket_cap_mb {args.cap_mb}, {rows[0]['buckets']} buckets; "
          f"device {args.device}, AdamL backend {backend}; {measure}")
    print(f"{'optimizer':<14} {'peak - model (MiB)':>19} {'peak - before (MiB)':>20} "
          f"{'model (MiB)':>12}")
    for r in rows:
        print(f"{r['optimizer']:<14} {(r['peak'] - r['model']) / MB:>19.1f} "
              f"{(r['peak'] - r['before']) / MB:>20.1f} {r['model'] / MB:>12.1f}"
              + ("" if r["hwm_reset"] else "  (VmHWM not reset)"))
    saved = (rows[1]["peak"] - rows[1]["model"]) - (rows[0]["peak"] - rows[0]["model"])
    print(f"gradient release lowers the ordinary AdamL step's peak by {saved / MB:.1f} MiB = "
          f"{saved / grads:.0%} of the gradient bytes (goal: >= 80%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "backend": backend, "cap_mb": args.cap_mb,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
