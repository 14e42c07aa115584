"""Train a small model with AdamL on every available backend: `python -m adaml_kernels.demo`.

A three-layer MLP learns a fixed random teacher network (regression, MSE). Every backend starts
from the same weights and sees the same batches, so their losses should agree closely; the
step time is the median wall time of `opt.step(loss)` alone (synchronised on CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import available_backends, unavailable_backends
from .optimizer import AdamL


def make_mlp(seed: int, device) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(),
        torch.nn.Linear(256, 256), torch.nn.GELU(),
        torch.nn.Linear(256, 1),
    ).to(device)


def train(backend: str, device, steps: int, batch: int = 256) -> tuple[list[float], float]:
    teacher, student = make_mlp(1, device), make_mlp(2, device)
    opt = AdamL(student.parameters(), lr=3e-3, backend=backend)
    data = torch.Generator(device="cpu").manual_seed(3)
    losses, step_times = [], []
    for _ in range(steps):
        x = torch.randn(batch, 64, generator=data).to(device)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.step(loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, statistics.median(step_times[steps // 10:]) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    params = sum(p.numel() for p in make_mlp(0, "cpu").parameters())
    print(f"AdamL demo: 3-layer MLP ({params:,} params) fits a random teacher on {device}, "
          f"{args.steps} steps, torch {torch.__version__}")
    for name, reason in unavailable_backends(device).items():
        print(f"  {name:<10} skipped: {reason}")
    print(f"  {'backend':<10} {'loss@0':>10} {'loss@mid':>10} {'final loss':>11} {'ms/step':>9}")
    for name in available_backends(device):
        losses, ms = train(name, device, args.steps)
        print(f"  {name:<10} {losses[0]:>10.4f} {losses[len(losses) // 2]:>10.4f} "
              f"{losses[-1]:>11.5f} {ms:>9.3f}")


if __name__ == "__main__":
    main()
