"""Host cost of gradient release against the ordinary fast path, on a model of many small tensors.

    python benchmarks/gradient_release_host.py [--layers 24] [--width 8] [--rounds 400]

The model: LAYERS blocks of LayerNorm(WIDTH), Linear(WIDTH, WIDTH), tanh, Linear(WIDTH, WIDTH)
(6 tensors a block) and a final Linear(WIDTH, 1): 24 x 8 is 146 tensors, 3,849 float32
parameters, 108 kB of optimizer traffic a step, so the kernels' own work is small and the host
work around them (hooks, checks, launches) is what shows. A batch of 4 rows, an MSE loss, one
CPU thread, the cpu backend.

Method. Every contender has its own copy of the model (the same initial weights) and steps it
in the same process; the contenders take turns within each round, in an order that rotates from
round to round; the garbage collector is off while timing. Each turn runs the forward and the
loss untimed, then times only what follows, with both the thread's CPU time
(time.thread_time: time the process was preempted by others on a shared machine is not
counted) and wall time (time.perf_counter):

    backward                loss.backward(), no optimizer: the baseline
    backward+hooks          loss.backward() with an empty Python post-accumulate-grad hook on
                            every parameter: what torch's calls of the hooks cost
    backward+no_grad_hooks  the same, each empty hook wrapped in torch.no_grad() (as AdamL's)
    adaml                   loss.backward(); opt.step(loss): the ordinary step (the fast path
                            of docs/backends.md, from the third step on)
    torch_fused             loss.backward(); torch.optim.Adam(fused=True).step(): for reference
    release                 opt.add_loss(loss); loss.backward(); opt.step(): gradient release,
                            bucket_cap_mb 25 (one bucket, launched by the last hook)
    release_per_layer       the same with buckets of about one block each (25 buckets)

(zero_grad(set_to_none=True) follows, untimed.) Reported per contender, in microseconds a step,
medians over the rounds:

    timed     the timed part
    over bwd  the median of (timed - the same round's backward): the host cost of the optimizer,
              for the release path its hooks and launches included. Under release the
              optimizer's work happens inside backward, so this, not opt.step, is the figure to
              compare with the ordinary step's opt.step (which has no work inside backward)
    opt.step  opt.step alone (release: what is left after backward)
    in hooks  release, wall time: the time inside AdamL's hook callback (StepEngine.grad_ready,
              wrapped with a perf_counter timer for this measurement; its launches included,
              torch's dispatch of the hooks not), summed over the step's hooks
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import statistics
import sys
import time
from collections import defaultdict

import torch

from adaml_kernels import AdamL

CONTENDERS = ("backward", "backward+hooks", "backward+no_grad_hooks", "adaml", "torch_fused",
              "release", "release_per_layer")
WARMUP = 20
BATCH = 4
LR = 1e-3


def make_model(layers: int, width: int) -> torch.nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.Tanh(),
                   torch.nn.Linear(width, width)]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(width, 1))


class Contender:
    """One model copy, its optimizer and what its turn times."""

    def __init__(self, name: str, base: torch.nn.Module, width: int):
        self.name = name
        self.model = copy.deepcopy(base)
        params = list(self.model.parameters())
        self.opt = None
        self.hook_s = 0.0  # time inside AdamL's hook callback in the current turn
        if name == "backward+hooks":
            for p in params:
                p.register_post_accumulate_grad_hook(lambda p: None)
        elif name == "backward+no_grad_hooks":
            for p in params:
                p.register_post_accumulate_grad_hook(torch.no_grad()(lambda p: None))
        elif name == "adaml":
            self.opt = AdamL(params, lr=LR, backend="cpu")
        elif name == "torch_fused":
            self.opt = torch.optim.Adam(params, lr=LR, fused=True)
        elif name.startswith("release"):
            # one block's gradient bytes: Linear(w, w) x 2 and LayerNorm(w), float32
            block_mb = (2 * (width * width + width) + 2 * width) * 4 / float(1 << 20)
            cap = 25.0 if name == "release" else block_mb
            self.opt = AdamL(params, lr=LR, backend="cpu", gradient_release=True,
                             bucket_cap_mb=cap)
            self._time_hooks()

    def _time_hooks(self) -> None:
        """Wrap the engine's hook callback (looked up at every hook) with a timer."""
        engine = self.opt.engine
        ready = engine.grad_ready

        def timed_ready(*args):
            t = time.perf_counter()
            try:
                ready(*args)
            finally:
                self.hook_s += time.perf_counter() - t

        engine.grad_ready = timed_ready

    def turn(self, x, y) -> dict:
        """One step: the timed part's wall and CPU time, opt.step's, and the time in hooks."""
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        release = self.name.startswith("release")
        self.hook_s = 0.0
        w0, c0 = time.perf_counter(), time.thread_time()
        if release:
            self.opt.add_loss(loss)
        loss.backward()
        w1, c1 = time.perf_counter(), time.thread_time()
        if release:
            self.opt.step()
        elif self.name == "adaml":
            self.opt.step(loss)
        elif self.name == "torch_fused":
            self.opt.step()
        w2, c2 = time.perf_counter(), time.thread_time()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)
        got = {"wall": w2 - w0, "cpu": c2 - c0}
        if self.opt is not None:
            got["step_wall"], got["step_cpu"] = w2 - w1, c2 - c1
        if release:
            got["hooks_wall"] = self.hook_s
        return got


def measure(layers: int, width: int, rounds: int) -> dict:
    torch.manual_seed(0)
    base = make_model(layers, width)
    params = list(base.parameters())
    contenders = [Contender(name, base, width) for name in CONTENDERS]
    x, y = torch.randn(BATCH, width), torch.randn(BATCH, 1)
    samples = {c.name: defaultdict(list) for c in contenders}
    gc.collect()
    gc.disable()
    try:
        for r in range(WARMUP + rounds):
            k = r % len(contenders)
            got = {c.name: c.turn(x, y) for c in contenders[k:] + contenders[:k]}
            if r < WARMUP:
                continue
            base_round = got["backward"]
            for name, values in got.items():
                for key, v in values.items():
                    samples[name][key].append(v)
                for clock in ("wall", "cpu"):
                    samples[name]["over_" + clock].append(values[clock] - base_round[clock])
    finally:
        gc.enable()
    buckets = {c.name: len(c.opt.engine.release.buckets) for c in contenders
               if c.name.startswith("release")}
    med = {name: {k: statistics.median(v) * 1e6 for k, v in t.items()}
           for name, t in samples.items()}
    return {"tensors": len(params), "params": sum(p.numel() for p in params),
            "buckets": buckets, "us": med, "rounds": rounds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = measure(args.layers, args.width, args.rounds)
    print(f"model: {args.layers} blocks of width {args.width}: {res['tensors']} tensors, "
          f"{res['params']:,} float32 parameters; batch {BATCH}; {args.threads} thread(s); "
          f"{res['rounds']} rounds after {WARMUP} warm-up; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print("buckets: " + ", ".join(f"{k} {v}" for k, v in res["buckets"].items()))
    print(f"{'':<24}{'CPU time of this thread':^34} | {'wall time':^44}")
    print(f"{'contender':<24}{'timed':>10}{'over bwd':>12}{'opt.step':>12} |"
          f"{'timed':>10}{'over bwd':>12}{'opt.step':>12}{'in hooks':>10}")

    def cell(m, key, width):
        return f"{m[key]:{width}.1f}" if key in m else f"{'-':>{width}}"

    for name, m in res["us"].items():
        if name == "backward":
            m = {k: v for k, v in m.items() if not k.startswith("over")}
        print(f"{name:<24}{cell(m, 'cpu', 10)}{cell(m, 'over_cpu', 12)}"
              f"{cell(m, 'step_cpu', 12)} |{cell(m, 'wall', 10)}{cell(m, 'over_wall', 12)}"
              f"{cell(m, 'step_wall', 12)}{cell(m, 'hooks_wall', 10)}")
    print("(us per step, medians over the rounds; over bwd: the timed part minus the same "
          "round's backward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
