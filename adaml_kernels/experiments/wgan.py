"""WGAN-GP on a 2-D mixture of 8 Gaussians on a ring, judged by MMD and mode coverage.

Generator and critic are small MLPs; the same optimizer type trains both, with the WGAN-GP
paper's betas (0.5, 0.9) and n_critic = 5, at one constant lr for every optimizer.

AdamL needs a loss whose value minus f* is positive. The critic's loss
    L_D = mean D(fake) - mean D(real) + LAMBDA * GP
is negative when it works. With a 1-Lipschitz critic (what the gradient penalty enforces),
mean D(real) - mean D(fake) <= W1(real, fake) <= E|x - y|, and both samples live near a ring of
radius RADIUS, so L_D >= -2 * RADIUS: AdamL's critic uses f* = -BOUND with BOUND = 2 * RADIUS.
The generator's loss is -mean D(fake) up to a constant, which the critic can shift at will;
it is therefore given as the Wasserstein estimate W = mean D(real) - mean D(fake) (the same
gradient), with the same f* = -BOUND. Each run records the smallest loss - f* that AdamL saw,
so a violated bound would show.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .common import (
    OPTIMIZERS, curve_stats, make_optimizer, mean_std, plot_band, pyplot, seed_everything, step,
    verdict,
)

MODES = 8
RADIUS = 2.0
STD = 0.05
BOUND = 2 * RADIUS
LAMBDA = 10.0
N_CRITIC = 5
BETAS = (0.5, 0.9)
LR = 3e-3
BATCH = 128
HIDDEN = 64
NOISE = 2


def settings(quick: bool) -> dict:
    if quick:
        return dict(iters=4, eval_every=2, eval_samples=256)
    return dict(iters=400, eval_every=40, eval_samples=1024)


def centers() -> torch.Tensor:
    angles = torch.arange(MODES, dtype=torch.float32) * (2 * math.pi / MODES)
    return RADIUS * torch.stack([angles.cos(), angles.sin()], 1)


def sample_real(n: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, MODES, (n,), generator=gen)
    return centers()[idx] + STD * torch.randn(n, 2, generator=gen)


def mlp(n_in: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, n_out))


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.5, 2.0)) -> float:
    """Biased MMD^2 with a sum of RBF kernels (bandwidths cover a mode's width and the ring)."""
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    k = sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    n = len(x)
    return (k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()).item()


def coverage(x: torch.Tensor) -> tuple[int, float]:
    """(modes covered, high-quality fraction): a sample is high quality within 3 std of a mode;
    a mode is covered when at least 1% of the samples are high-quality samples of it."""
    d = torch.cdist(x, centers())
    nearest = d.argmin(1)
    good = d.min(1).values < 3 * STD
    counts = torch.bincount(nearest[good], minlength=MODES)
    return int((counts >= 0.01 * len(x)).sum()), good.float().mean().item()


def gradient_penalty(critic, real, fake, gen) -> torch.Tensor:
    a = torch.rand(len(real), 1, generator=gen)
    mix = (a * real + (1 - a) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
    return ((g.norm(dim=1) - 1) ** 2).mean()


def train(opt_name: str, seed: int, cfg: dict) -> dict:
    gen = seed_everything(seed)
    G, D = mlp(NOISE, 2), mlp(2, 1)
    kw = dict(loss_offset=-BOUND) if opt_name == "AdamL" else {}
    opt_g = make_optimizer(opt_name, G.parameters(), LR, betas=BETAS, **kw)
    opt_d = make_optimizer(opt_name, D.parameters(), LR, betas=BETAS, **kw)
    eval_gen = torch.Generator().manual_seed(10_000 + seed)
    real_eval = sample_real(cfg["eval_samples"], eval_gen)
    z_eval = torch.randn(cfg["eval_samples"], NOISE, generator=eval_gen)
    log = {"iters": [], "mmd": [], "modes": [], "quality": [], "w_est": []}
    min_l = math.inf  # smallest loss - f* seen (the bound holds while it is > 0)
    for it in range(1, cfg["iters"] + 1):
        for _ in range(N_CRITIC):
            real = sample_real(BATCH, gen)
            with torch.no_grad():
                fake = G(torch.randn(BATCH, NOISE, generator=gen))
            d_real, d_fake = D(torch.cat([real, fake])).split(BATCH)
            w_est = d_real.mean() - d_fake.mean()
            loss_d = -w_est + LAMBDA * gradient_penalty(D, real, fake, gen)
            opt_d.zero_grad()
            loss_d.backward()
            step(opt_d, loss_d)
            min_l = min(min_l, loss_d.item() + BOUND)
        real = sample_real(BATCH, gen)
        fake = G(torch.randn(BATCH, NOISE, generator=gen))
        loss_g = D(real).mean().detach() - D(fake).mean()  # = W estimate; grad of -D(fake)
        opt_g.zero_grad()
        loss_g.backward()
        step(opt_g, loss_g)
        min_l = min(min_l, loss_g.item() + BOUND)
        if it % cfg["eval_every"] == 0 or it == cfg["iters"]:
            with torch.no_grad():
                x = G(z_eval)
            modes, quality = coverage(x)
            log["iters"].append(it)
            log["mmd"].append(mmd2(x, real_eval))
            log["modes"].append(modes)
            log["quality"].append(quality)
            log["w_est"].append(w_est.item())
    log["min_loss_minus_fstar"] = min_l
    with torch.no_grad():
        log["final_samples"] = G(z_eval[:512]).tolist()
    return log


def run(quick: bool = False, seeds: int = 3, sweep: bool = False) -> dict:
    cfg = settings(quick)
    out = {"lr": LR, "betas": list(BETAS), "batch": BATCH, "n_critic": N_CRITIC, "lambda": LAMBDA,
           "modes": MODES, "radius": RADIUS, "std": STD, "adaml_loss_offset": -BOUND,
           "seeds": seeds, **cfg, "runs": {}}
    for name in OPTIMIZERS:
        runs = [train(name, s, cfg) for s in range(seeds)]
        out["iters_axis"] = runs[0]["iters"]
        final_mmd = [r["mmd"][-1] for r in runs]
        out["runs"][name] = {
            **{key: curve_stats([r[key] for r in runs]) for key in ("mmd", "modes", "quality")},
            "final_mmd": final_mmd, "final_mmd_mean_std": mean_std(final_mmd),
            "final_modes_mean_std": mean_std([r["modes"][-1] for r in runs]),
            "final_quality_mean_std": mean_std([r["quality"][-1] for r in runs]),
            "min_loss_minus_fstar": min(r["min_loss_minus_fstar"] for r in runs),
            "samples_seed0": runs[0]["final_samples"],
        }
    adaml = out["runs"]["AdamL"]["final_mmd"]
    out["verdicts"] = {n: verdict(adaml, out["runs"][n]["final_mmd"], higher_is_better=False)
                       for n in OPTIMIZERS if n != "AdamL"}
    return out


def plot(result: dict, path: str) -> list[str]:
    plt = pyplot()
    names = list(result["runs"])
    fig = plt.figure(figsize=(12, 6.5))
    ax_mmd = fig.add_subplot(2, 2, 1)
    ax_modes = fig.add_subplot(2, 2, 2)
    x = result["iters_axis"]
    for name, r in result["runs"].items():
        plot_band(ax_mmd, x, r["mmd"], name)
        plot_band(ax_modes, x, r["modes"], name)
    ax_mmd.set_yscale("log")
    ax_mmd.set_title("WGAN-GP, 8 Gaussians: MMD² to the data\n"
                     f"(mean ± std, {result['seeds']} seeds)", fontsize=10)
    ax_modes.set_title("modes covered (of 8)", fontsize=10)
    for ax in (ax_mmd, ax_modes):
        ax.set_xlabel("generator iteration")
        ax.legend(fontsize=8)
    c = centers().numpy()
    for i, name in enumerate(names):
        ax = fig.add_subplot(2, len(names), len(names) + i + 1)
        s = np.asarray(result["runs"][name]["samples_seed0"])
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5, color="tab:gray")
        ax.scatter(c[:, 0], c[:, 1], s=20, marker="x", color="k")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_title(f"{name}: samples (seed 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]
