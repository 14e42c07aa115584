"""What the experiments share: the optimizers under test, seeding, statistics and plotting."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import torch

from adaml_kernels import AdamL, backends

from .baselines import AdaBelief, EAdam

# Every optimizer gets the same betas and eps (Adam's defaults) unless an experiment says otherwise.
BETAS = (0.9, 0.999)
EPS = 1e-8
OPTIMIZERS = ("AdamL", "Adam", "EAdam", "AdaBelief")
COLORS = {"AdamL": "tab:red", "Adam": "tab:blue", "EAdam": "tab:green", "AdaBelief": "tab:purple",
          "Adam (no decay)": "tab:cyan"}
# Adam and EAdam differ only by eps = 1e-8 inside the second moment; dashes keep both visible.
STYLES = {"AdamL": "-", "Adam": "--", "EAdam": "-", "AdaBelief": "-", "Adam (no decay)": ":"}


def make_optimizer(name: str, params, lr: float, betas=BETAS, eps=EPS, **adaml_kwargs):
    """The optimizer `name`; adaml_kwargs (gamma, phi, loss_offset, ...) go to AdamL only."""
    params = list(params)
    if name == "AdamL":
        return AdamL(params, lr=lr, betas=betas, eps=eps, backend="auto", **adaml_kwargs)
    if name.startswith("Adam ") or name == "Adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
    if name == "EAdam":
        return EAdam(params, lr=lr, betas=betas, eps=eps)
    if name == "AdaBelief":
        return AdaBelief(params, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"unknown optimizer {name!r}")


def step(opt, loss: torch.Tensor) -> None:
    """One step: AdamL reads the loss whose gradients are in .grad, the others ignore it."""
    if isinstance(opt, AdamL):
        opt.step(loss.detach())
    else:
        opt.step()


def adaml_backend(device="cpu", dtype=torch.float32) -> str:
    """The backend that AdamL(backend='auto') runs for parameters of this device and dtype."""
    return backends.select("auto", torch.device(device), dtype)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def mean_std(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def curve_stats(curves: list[list[float]]) -> dict:
    """Mean and std, point by point, of equally long curves (one per seed)."""
    arr = np.asarray(curves, dtype=float)
    std = arr.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(arr.shape[1])
    return {"mean": arr.mean(axis=0).tolist(), "std": std.tolist()}


def verdict(adaml: list[float], other: list[float], higher_is_better: bool) -> str:
    """'win', 'tie' or 'loss' for AdamL: a win or loss needs the means to differ by more than
    the larger of the two standard deviations (a deliberately plain rule for 3-5 seeds)."""
    (ma, sa), (mo, so) = mean_std(adaml), mean_std(other)
    diff = (ma - mo) if higher_is_better else (mo - ma)
    if abs(diff) <= max(sa, so):
        return "tie"
    return "win" if diff > 0 else "loss"


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_band(ax, x, stats: dict, label: str) -> None:
    mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    color = COLORS.get(label, "k")
    ax.plot(x, mean, label=label, color=color, ls=STYLES.get(label, "-"), lw=1.5)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def heatmap(ax, values, xs, ys, xlabel, ylabel, title, fmt="{:.2f}", cmap="viridis", labels=None):
    """values[i][j] for y = ys[i], x = xs[j], each cell annotated (with labels[i][j] if given).
    NaN cells are drawn light grey."""
    import matplotlib

    arr = np.asarray(values, dtype=float)
    cmap = matplotlib.colormaps[cmap].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(arr), origin="lower", cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            r, g, b, _ = im.cmap(im.norm(arr[i, j]))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # luminance of the cell's colour
            text = labels[i][j] if labels is not None else fmt.format(arr[i, j])
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    return im
