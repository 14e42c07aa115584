"""The GPT example (gpt_model.py) trained by AdamL with float32, bf16 and 8-bit moments, over
several seeds: validation loss against steps, and each mode's final loss against fp32's.

    python examples/gpt_precision.py                       # 1000 steps, 3 seeds (~15 min on 2 cores)
    python examples/gpt_precision.py --steps 40 --seeds 1  # a smoke run

The model, its weights and activations stay float32 (no autocast): only the optimizer's storage
of the moments differs between modes, so the curves show what the moment precision alone does.
Every mode sees the same initial weights and batches for a seed. The last tenth of the bytes is
held out; the validation loss is the mean cross-entropy over fixed windows of it. Gradients are
clipped to norm 1, as in train_gpt.py. `--out FILE` writes the results as JSON and `--plot FILE`
the figure (both go in docs/ for the low-precision page).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt_model import GPT, batch, load_bytes  # noqa: E402

from adaml_kernels import AdamL, quant8  # noqa: E402
from adaml_kernels.experiments.common import mean_std  # noqa: E402

BF16 = torch.bfloat16
# name -> AdamL's options for the moments
MODES = {
    "fp32 moments": {},
    "bf16 moments": dict(state_dtype=BF16),
    "bf16 moments + SR": dict(state_dtype=BF16, stochastic_rounding=True),
    "8-bit moments": dict(state_dtype=torch.uint8),
    "8-bit moments + SR": dict(state_dtype=torch.uint8, stochastic_rounding=True),
}
STYLE = {"fp32 moments": ("black", "-"), "bf16 moments": ("tab:orange", "-"),
         "bf16 moments + SR": ("tab:purple", "--"), "8-bit moments": ("tab:brown", "-."),
         "8-bit moments + SR": ("tab:cyan", "--")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-windows", type=int, default=256)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE", help="write the figure (needs matplotlib)")
    return p.parse_args(argv)


def split(data: torch.Tensor, seq_len: int, windows: int):
    """(training bytes, validation inputs, validation targets): the last tenth held out."""
    cut = len(data) * 9 // 10
    val = data[cut:]
    starts = torch.linspace(0, len(val) - seq_len - 2, windows).long()
    w = val[starts[:, None] + torch.arange(seq_len + 1)].long()
    return data[:cut], w[:, :-1], w[:, 1:]


def state_bytes(opt) -> int:
    keys = ("exp_avg", "exp_avg_sq", *quant8.SCALE_KEYS.values())
    return sum(t.numel() * t.element_size() for st in opt.state.values()
               for key, t in st.items() if key in keys)


def train(mode: str, seed: int, args, data) -> dict:
    train_bytes, xv, yv = data
    torch.manual_seed(seed)  # the same initial weights in every mode
    model = GPT(args.d_model, args.layers, args.seq_len)
    options = MODES[mode]
    opt = AdamL(model.parameters(), lr=args.lr, **options,
                **(dict(seed=seed) if options.get("stochastic_rounding") else {}))
    steps, val_loss = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = batch(train_bytes, step, seed, args.batch_size, args.seq_len)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(loss.detach())
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with torch.no_grad():
                steps.append(step + 1)
                val_loss.append(F.cross_entropy(model(xv).flatten(0, 1), yv.flatten()).item())
    return {"steps": steps, "val_loss": val_loss, "state_bytes": state_bytes(opt),
            "seconds": time.perf_counter() - start}


def run(args) -> dict:
    data = split(load_bytes(), args.seq_len, args.val_windows)
    out = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
           "params": sum(p.numel() for p in GPT(args.d_model, args.layers,
                                                 args.seq_len).parameters()),
           "modes": {}}
    for mode in args.modes:
        runs = [train(mode, s, args, data) for s in range(args.seeds)]
        final = [r["val_loss"][-1] for r in runs]
        out["modes"][mode] = {"steps": runs[0]["steps"],
                              "val_loss": [r["val_loss"] for r in runs],
                              "final_loss": final, "final_mean_std": mean_std(final),
                              "state_bytes": runs[0]["state_bytes"],
                              "seconds": sum(r["seconds"] for r in runs)}
        m, s = out["modes"][mode]["final_mean_std"]
        print(f"{mode:20s} final validation loss {m:.4f} ± {s:.4f}  "
              f"state {runs[0]['state_bytes']} B  {out['modes'][mode]['seconds']:.0f} s",
              flush=True)
    if "fp32 moments" in out["modes"]:
        base = out["modes"]["fp32 moments"]["final_mean_std"][0]
        for r in out["modes"].values():
            r["vs_fp32"] = r["final_mean_std"][0] / base - 1
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for mode, r in result["modes"].items():
        curves = torch.tensor(r["val_loss"], dtype=torch.float64)
        mean = curves.mean(0)
        std = curves.std(0) if len(curves) > 1 else torch.zeros_like(mean)
        color, ls = STYLE[mode]
        m, s = r["final_mean_std"]
        ax.plot(r["steps"], mean, color=color, ls=ls, lw=1.5, label=f"{mode}: {m:.3f} ± {s:.3f}")
        ax.fill_between(r["steps"], mean - std, mean + std, color=color, alpha=0.15, lw=0)
    ax.set_title(f"GPT ({result['params'] / 1e6:.2f}M params), AdamL lr {cfg['lr']:g}: validation "
                 f"loss\n(mean ± std over {cfg['seeds']} seeds; legend: final loss)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy, nats per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
