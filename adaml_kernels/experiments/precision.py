"""Low-precision training: the char LSTM (lstm.py) trained by AdamL in fp32, in bf16 with rounding
to nearest, bf16 with stochastic rounding, bf16 with fp32 master weights, and fp32 with bf16
moments and with 8-bit moments (each rounded to nearest, and stochastically), over the same
seeds and batches.

bf16 runs keep the whole model in bf16 (weights, activations, gradients; the loss is computed in
float32 from bf16 logits), so they differ from fp32 both in how weights are stored and in the
arithmetic of the forward and backward passes; among the bf16 runs only the optimizer's storage
differs. At lr 1e-3 Adam's steps are smaller than half a bf16 ulp of most weights (|w| > 0.5
needs a step of 2^-9 |w| ~ 1e-3 to move at all), which is what stochastic rounding and master
weights are for; lr 3e-3 shows the same at a rate where fewer updates are lost.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from adaml_kernels import AdamL, quant8

from .common import curve_stats, mean_std, pyplot, seed_everything
from .lstm import BATCH, SEQ, CharLSTM, _windows, load_text

BF16 = torch.bfloat16
# name -> (parameter dtype, AdamL's low-precision options)
MODES = {
    "fp32": (torch.float32, {}),
    "bf16, round to nearest": (BF16, {}),
    "bf16 + stochastic rounding": (BF16, dict(stochastic_rounding=True)),
    "bf16 + master weights": (BF16, dict(master_weights=True)),
    "fp32 + bf16 moments": (torch.float32, dict(state_dtype=BF16)),
    "fp32 + bf16 moments + SR": (torch.float32, dict(state_dtype=BF16, stochastic_rounding=True)),
    "fp32 + 8-bit moments": (torch.float32, dict(state_dtype=torch.uint8)),
    "fp32 + 8-bit moments + SR": (torch.float32, dict(state_dtype=torch.uint8,
                                                      stochastic_rounding=True)),
}
COLORS = dict(zip(MODES, ("black", "tab:red", "tab:blue", "tab:green", "tab:orange",
                          "tab:purple", "tab:brown", "tab:cyan")))
STYLES = dict(zip(MODES, ("-", "-", "--", ":", "-", "--", "-.", "--")))


def settings(quick: bool) -> dict:
    if quick:
        return dict(steps=60, eval_every=30, hidden=16, embed=8, val_chars=1024, lrs=[1e-3])
    return dict(steps=1500, eval_every=100, hidden=64, embed=32, val_chars=8192,
                lrs=[1e-3, 3e-3])


def train(mode: str, lr: float, seed: int, cfg: dict, data) -> dict:
    """One run: validation loss (nats per character) every eval_every steps, the optimizer's
    state bytes and the wall time."""
    train_ids, val_ids, vocab = data
    dtype, options = MODES[mode]
    gen = seed_everything(seed)
    model = CharLSTM(len(vocab), cfg["embed"], cfg["hidden"]).to(dtype)  # same init for all
    # The stochastic-rounding seed follows the run's seed, so the seeds differ in it too.
    opt = AdamL(model.parameters(), lr=lr, loss_offset=0.0, **options,
                **(dict(seed=seed) if options.get("stochastic_rounding") else {}))
    val = val_ids[: cfg["val_chars"] + 1]
    val_starts = torch.arange(0, len(val) - SEQ - 1, SEQ)
    loss_fn = nn.CrossEntropyLoss()
    steps, val_loss = [], []
    start = time.perf_counter()
    for k in range(1, cfg["steps"] + 1):
        x, y = _windows(train_ids, torch.randint(0, len(train_ids) - SEQ - 1, (BATCH,),
                                                  generator=gen))
        opt.zero_grad()
        loss = loss_fn(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step(loss.detach())
        if k % cfg["eval_every"] == 0 or k == cfg["steps"]:
            with torch.no_grad():
                xv, yv = _windows(val, val_starts)
                steps.append(k)
                val_loss.append(loss_fn(model(xv).float().flatten(0, 1), yv.flatten()).item())
    state_keys = ("exp_avg", "exp_avg_sq", "master_param", *quant8.SCALE_KEYS.values())
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values()
                      for key, t in st.items() if key in state_keys)
    w = torch.cat([_exp_avg_sq(st).flatten() for st in opt.state.values()])
    return {"steps": steps, "val_loss": val_loss, "state_bytes": state_bytes,
            "exp_avg_sq_median": float(w.median()),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "seconds": time.perf_counter() - start}


def _exp_avg_sq(st: dict) -> torch.Tensor:
    """A parameter's exp_avg_sq as float32 values (8-bit moments decoded)."""
    if "exp_avg_sq_scale" in st:
        return quant8.decode_moment(st["exp_avg_sq"], st["exp_avg_sq_scale"], "exp_avg_sq")
    return st["exp_avg_sq"].float()


def bf16_walk(steps: int = 100, lr: float = 1e-3, n: int = 4096) -> dict:
    """The issue's check: n parameters at 1.0, gradient 1, lr 1e-3, `steps` steps."""
    out = {}
    for name, dtype, options in (("fp32", torch.float32, {}),
                                 ("bf16, round to nearest", BF16, {}),
                                 ("bf16 + stochastic rounding", BF16,
                                  dict(stochastic_rounding=True)),
                                 ("bf16 + master weights", BF16, dict(master_weights=True))):
        p = torch.ones(n, dtype=dtype, requires_grad=True)
        opt = AdamL([p], lr=lr, **options)
        for _ in range(steps):
            p.grad = torch.ones_like(p)
            opt.step(1.0)
        v = p.detach().float()
        out[name] = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
                     "max": float(v.max())}
    return out


def run(quick: bool = False, seeds: int = 3, sweep: bool = False) -> dict:
    cfg = settings(quick)
    data = load_text()
    out = {"seq": SEQ, "batch": BATCH, "vocab": len(data[2]), "seeds": seeds, **cfg,
           "modes": {name: {"dtype": str(d)[6:], "options": {k: str(v) for k, v in o.items()}}
                     for name, (d, o) in MODES.items()},
           "walk": bf16_walk(), "by_lr": {}}
    for lr in cfg["lrs"]:
        runs = {}
        for mode in MODES:
            results = [train(mode, lr, s, cfg, data) for s in range(seeds)]
            final = [r["val_loss"][-1] for r in results]
            runs[mode] = {
                "steps": results[0]["steps"],
                "val_loss": curve_stats([r["val_loss"] for r in results]),
                "final_loss": final, "final_loss_mean_std": mean_std(final),
                "state_bytes": results[0]["state_bytes"],
                "exp_avg_sq_median": mean_std([r["exp_avg_sq_median"] for r in results])[0],
                "param_bytes": results[0]["param_bytes"],
                "seconds": sum(r["seconds"] for r in results),
            }
        base_mean, base_std = runs["fp32"]["final_loss_mean_std"]
        for r in runs.values():
            # the final exp_avg_sq (median over all elements, mean over seeds) against fp32's
            r["exp_avg_sq_vs_fp32"] = r["exp_avg_sq_median"] / runs["fp32"]["exp_avg_sq_median"]
            m, s = r["final_loss_mean_std"]
            r["vs_fp32"] = m - base_mean
            # plain rule (as common.verdict): different only beyond the larger std of the two
            r["verdict"] = ("same as fp32" if abs(m - base_mean) <= max(s, base_std)
                            else ("worse than fp32" if m > base_mean else "better than fp32"))
        out["by_lr"][str(lr)] = runs
    return out


def plot(result: dict, path: str) -> list[str]:
    plt = pyplot()
    lrs = list(result["by_lr"])
    fig, axes = plt.subplots(1, len(lrs), figsize=(6.5 * len(lrs), 4.6), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for name, r in result["by_lr"][lr].items():
            x = r["steps"]
            mean, std = np.asarray(r["val_loss"]["mean"]), np.asarray(r["val_loss"]["std"])
            m, s = r["final_loss_mean_std"]
            ax.plot(x, mean, color=COLORS[name], ls=STYLES[name], lw=1.5,
                    label=f"{name}: {m:.3f} ± {s:.3f}")
            ax.fill_between(x, mean - std, mean + std, color=COLORS[name], alpha=0.15, lw=0)
        ax.set_title(f"char LSTM, AdamL lr = {float(lr):g}: validation loss\n"
                     f"(mean ± std over {result['seeds']} seeds; legend: final loss)",
                     fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy, nats per character")
        finals = [v for r in result["by_lr"][lr].values() for v in r["val_loss"]["mean"]]
        if finals and all(math.isfinite(v) for v in finals):
            lo = min(finals)
            ax.set_ylim(lo - 0.05, min(max(finals), lo + 1.5))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]
