"""Deterministic test functions: the Three-Hump Camel and the 2-D Rosenbrock.

Each optimizer runs on a small learning-rate grid from a fixed start; we record the iterations to
reach f - f* < TOL, or the best gap within the budget. AdamL is given l = f - f* (f* = 0 for
both). Seeds beyond the first start from x0 plus Gaussian noise (std START_NOISE), which shows
whether a result depends on the exact start. All arithmetic is float64, so 1e-6 is reachable.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .common import COLORS, OPTIMIZERS, STYLES, heatmap, make_optimizer, pyplot, seed_everything

TOL = 1e-6
GRAD_TOL = 1e-8  # |grad f| below this away from f*: stuck at another stationary point, stop
START_NOISE = 0.25
# The local minima of the camel (f ~ 0.2986) lie near (+-1.7476, -+0.8738); the global one is 0.
CAMEL_LOCAL = ((1.7476, -0.8738), (-1.7476, 0.8738))


def camel(x, y):
    return 2 * x**2 - 1.05 * x**4 + x**6 / 6 + x * y + y**2


def camel_grad(x, y):
    return (4 * x - 4.2 * x**3 + x**5 + y, x + 2 * y)


def rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def rosenbrock_grad(x, y):
    return (-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2))


PROBLEMS = {
    "camel": dict(title="Three-Hump Camel", f=camel, grad=camel_grad, x0=(0.0, -4.0),
                  xstar=(0.0, 0.0), box=((-2.5, 2.5), (-4.5, 2.0))),
    "rosenbrock": dict(title="Rosenbrock", f=rosenbrock, grad=rosenbrock_grad, x0=(-2.0, 2.0),
                       xstar=(1.0, 1.0), box=((-2.5, 2.0), (-1.0, 4.5))),
}
F_STAR = 0.0


def settings(quick: bool) -> dict:
    if quick:
        return dict(budget=300, lrs=(0.01, 0.1), gammas=(0.1, 1.0), phis=(1.0, 2.0))
    return dict(budget=5000, lrs=(0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
                gammas=(0.01, 0.1, 1.0, 10.0, 100.0), phis=(0.25, 0.5, 1.0, 2.0, 4.0))


def minimize(problem: str, opt_name: str, lr: float, budget: int, x0, gamma=1.0, phi=1.0,
             keep_path: bool = True) -> dict:
    """Run one optimizer until f - f* < TOL, a stationary point, or the budget is spent."""
    f, grad = PROBLEMS[problem]["f"], PROBLEMS[problem]["grad"]
    xy = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    kw = dict(gamma=gamma, phi=phi, loss_offset=F_STAR) if opt_name == "AdamL" else {}
    opt = make_optimizer(opt_name, [xy], lr, **kw)
    xy.grad = torch.zeros_like(xy)  # written in place each step, so AdamL keeps its plan
    path, gaps, best, hit, stop = [list(x0)], [], math.inf, None, "budget"
    for k in range(budget + 1):  # k = iterations taken so far
        # closed-form f and gradient in Python floats: autograd would cost more than the step
        x, y = xy.tolist()
        try:
            value = f(x, y)
        except OverflowError:
            value = math.inf
        gap = value - F_STAR
        if not math.isfinite(gap) or gap > 1e12:
            stop = "diverged"
            break
        gaps.append(gap)
        best = min(best, gap)
        if gap < TOL:
            hit, stop = k, "tol"
            break
        if k == budget:
            break
        g = grad(x, y)
        if math.hypot(*g) < GRAD_TOL:
            stop = "stationary"
            break
        xy.grad.copy_(torch.tensor(g, dtype=torch.float64))
        if opt_name == "AdamL":
            opt.step(value)
        else:
            opt.step()
        if keep_path:
            path.append(xy.detach().tolist())
    final = xy.detach().tolist()
    return dict(lr=lr, iters_to_tol=hit, stop=stop, iters=len(gaps) - 1, best_gap=best,
                final_gap=gaps[-1] if gaps else math.nan, final_x=final,
                minimum=_which_minimum(problem, final), gaps=_thin(gaps),
                path=_thin_path(path) if keep_path else None)


def _which_minimum(problem: str, xy) -> str:
    if math.dist(xy, PROBLEMS[problem]["xstar"]) < 0.05:
        return "global"
    if problem == "camel" and any(math.dist(xy, m) < 0.05 for m in CAMEL_LOCAL):
        return "local"
    return "none"


def _thin(gaps: list[float]) -> list[list[float]]:
    """[iteration, gap] pairs at about 150 log-spaced iterations (plus the last)."""
    n = len(gaps)
    if n == 0:
        return []
    idx = sorted(set(np.unique(np.geomspace(1, n, 150).astype(int) - 1).tolist()) | {n - 1})
    return [[i, gaps[i]] for i in idx]


def _thin_path(path, keep=400):
    step = max(1, len(path) // keep)
    return path[::step] + ([path[-1]] if (len(path) - 1) % step else [])


def _better(a: dict, b: dict) -> bool:
    """Is run a better than run b: fewer iterations to TOL, else a lower best gap."""
    ka = a["iters_to_tol"] if a["iters_to_tol"] is not None else math.inf
    kb = b["iters_to_tol"] if b["iters_to_tol"] is not None else math.inf
    return (ka, a["best_gap"]) < (kb, b["best_gap"])


def run(quick: bool = False, seeds: int = 3, sweep: bool = True) -> dict:
    cfg = settings(quick)
    out = {"tol": TOL, "f_star": F_STAR, "start_noise": START_NOISE, "seeds": seeds, **cfg,
           "problems": {}}
    for name, prob in PROBLEMS.items():
        res = {"x0": list(prob["x0"]), "grid": {}, "best": {}, "perturbed": {}}
        for opt_name in OPTIMIZERS:
            runs = [minimize(name, opt_name, lr, cfg["budget"], prob["x0"]) for lr in cfg["lrs"]]
            best = runs[0]
            for r in runs[1:]:
                best = r if _better(r, best) else best
            res["grid"][opt_name] = [{k: v for k, v in r.items() if k not in ("path", "gaps")}
                                     for r in runs]
            res["best"][opt_name] = best
            # the same optimizer and lr from perturbed starts: does the result hold?
            starts = []
            for s in range(1, seeds):
                g = seed_everything(s)
                x0 = (torch.tensor(prob["x0"], dtype=torch.float64)
                      + START_NOISE * torch.randn(2, generator=g, dtype=torch.float64)).tolist()
                r = minimize(name, opt_name, best["lr"], cfg["budget"], x0, keep_path=False)
                starts.append(dict(x0=x0, iters_to_tol=r["iters_to_tol"], best_gap=r["best_gap"],
                                   minimum=r["minimum"]))
            res["perturbed"][opt_name] = starts
        if sweep:
            res["sweep"] = _sweep(name, res["best"]["AdamL"]["lr"], cfg)
        out["problems"][name] = res
    return out


def _sweep(problem: str, lr: float, cfg: dict) -> dict:
    """AdamL over gamma x phi at its best lr: iterations to TOL (None if never), best gap and
    why each run stopped. Rows are phi, columns gamma."""
    cells = [[minimize(problem, "AdamL", lr, cfg["budget"], PROBLEMS[problem]["x0"],
                       gamma=gamma, phi=phi, keep_path=False)
              for gamma in cfg["gammas"]] for phi in cfg["phis"]]
    table = {key: [[c[key] for c in row] for row in cells]
             for key in ("iters_to_tol", "best_gap", "stop", "minimum")}
    return {"lr": lr, "gammas": list(cfg["gammas"]), "phis": list(cfg["phis"]), **table}


# ------------------------------------------------------------------------------- plots

def plot(result: dict, path: str) -> list[str]:
    plt = pyplot()
    probs = result["problems"]
    fig, axes = plt.subplots(2, len(probs), figsize=(5.2 * len(probs), 8.4))
    for col, (name, res) in enumerate(probs.items()):
        prob = PROBLEMS[name]
        ax = axes[0, col]
        (x_lo, x_hi), (y_lo, y_hi) = prob["box"]
        X, Y = np.meshgrid(np.linspace(x_lo, x_hi, 200), np.linspace(y_lo, y_hi, 200))
        Z = prob["f"](X, Y) - F_STAR
        ax.contour(X, Y, np.log10(np.maximum(Z, 1e-3)), levels=18, colors="0.6", linewidths=0.5)
        for opt_name, best in res["best"].items():
            p = np.asarray(best["path"])
            ax.plot(p[:, 0], p[:, 1], color=COLORS[opt_name], ls=STYLES[opt_name], lw=1.2,
                    label=f"{opt_name} (lr={best['lr']:g})")
        ax.plot(*prob["x0"], "ko", ms=5)
        ax.plot(*prob["xstar"], "k*", ms=10)
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        ax.set_title(f"{prob['title']}: trajectories (best lr each)", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[1, col]
        for opt_name, best in res["best"].items():
            it, gap = zip(*best["gaps"])
            ax.loglog(np.asarray(it) + 1, np.maximum(gap, 1e-16), color=COLORS[opt_name],
                      ls=STYLES[opt_name], label=opt_name)
        ax.axhline(result["tol"], color="k", ls=":", lw=0.8)
        ax.set_xlabel("iteration")
        ax.set_ylabel("f - f*")
        ax.set_title(f"{prob['title']}: f - f* (dotted: {result['tol']:g})", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    written = [path]
    if all("sweep" in r for r in probs.values()):
        written.append(plot_sweep(result, _sibling(path, "sweep")))
    return written


def plot_sweep(result: dict, path: str) -> str:
    plt = pyplot()
    probs = result["problems"]
    fig, axes = plt.subplots(1, len(probs), figsize=(5.2 * len(probs), 3.8))
    for ax, (name, res) in zip(np.atleast_1d(axes), probs.items()):
        sw = res["sweep"]
        budget = result["budget"]
        # colour: iterations to TOL (the budget if never reached); grey: diverged
        values = [[math.nan if why == "diverged" else (k if k is not None else budget)
                   for k, why in zip(ks, whys)] for ks, whys in zip(sw["iters_to_tol"], sw["stop"])]
        labels = [[_cell_label(k, g, why) for k, g, why in zip(*row)]
                  for row in zip(sw["iters_to_tol"], sw["best_gap"], sw["stop"])]
        heatmap(ax, values, sw["gammas"], sw["phis"], "gamma", "phi",
                f"{PROBLEMS[name]['title']}: AdamL iterations to f-f*<{result['tol']:g}\n"
                f"(lr={sw['lr']:g}; else best gap; grey: diverged)", labels=labels,
                cmap="viridis_r")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _cell_label(iters, gap, stop) -> str:
    if iters is not None:
        return str(iters)
    return "div" if stop == "diverged" else f"{gap:.0e}"


def _sibling(path: str, suffix: str) -> str:
    stem, dot, ext = path.rpartition(".")
    return f"{stem}_{suffix}.{ext}" if dot else f"{path}_{suffix}"
