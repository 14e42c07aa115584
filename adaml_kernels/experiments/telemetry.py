"""AdamL's two modes, watched through its telemetry: the char LSTM (lstm.py) and the GPT example
(examples/gpt_model.py) trained with `telemetry=True` at three settings of (gamma, phi) and at
eps 1e-8 and 1e-12, recording after every step the loss, `sgd_like_fraction` (the share of
elements where eps * l outweighs the adaptive term (1 - b2) g^2 / (gamma l^phi)) and
`update_rms`.

When eps * l dominates w, w is about eps * l / (1 - b2) and AdamL steps like SGD with momentum;
when the adaptive term dominates, it steps like Adam. The switch point of an element is where
l^(phi + 1) = (1 - b2) g^2 / (gamma eps): larger gamma or phi, or larger eps, keep it SGD-like
longer. One seed per setting: the figures are traces of one run each, not averages.

The GPT comes from the repository's examples/ (a source checkout is needed for it).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from adaml_kernels import AdamL

from .common import pyplot, seed_everything
from .lstm import BATCH, SEQ, CharLSTM, _windows, load_text

SETTINGS = ((1.0, 1.0), (1.0, 3.0), (0.01, 1.0))  # (gamma, phi); (1, 1) is the default
EPSILONS = (1e-8, 1e-12)
LR = 3e-3
KEYS = ("sgd_like_fraction", "update_rms")


def settings(quick: bool) -> dict:
    if quick:
        return dict(steps=12, lstm=dict(embed=8, hidden=16), gpt=dict(d_model=32, layers=1),
                    gpt_batch=4, gpt_seq=16)
    return dict(steps=1000, lstm=dict(embed=32, hidden=64), gpt=dict(d_model=64, layers=2),
                gpt_batch=16, gpt_seq=64)


def _gpt_module():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "examples", "gpt_model.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the GPT of this experiment is {path}: run it from a source "
                                "checkout of adaml_kernels")
    spec = importlib.util.spec_from_file_location("adaml_examples_gpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lstm_task(cfg: dict, seed: int):
    train_ids, _, vocab = load_text()
    gen = seed_everything(seed)
    model = CharLSTM(len(vocab), **cfg["lstm"])

    def loss_of_step(step: int) -> torch.Tensor:
        starts = torch.randint(0, len(train_ids) - SEQ - 1, (BATCH,), generator=gen)
        x, y = _windows(train_ids, starts)
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    return model, loss_of_step


def _gpt_task(cfg: dict, seed: int):
    gpt = _gpt_module()
    data = gpt.load_bytes()
    torch.manual_seed(seed)
    model = gpt.GPT(seq_len=cfg["gpt_seq"], **cfg["gpt"])

    def loss_of_step(step: int) -> torch.Tensor:
        x, y = gpt.batch(data, step, seed, cfg["gpt_batch"], cfg["gpt_seq"])
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    return model, loss_of_step


TASKS = {"char LSTM": _lstm_task, "GPT": _gpt_task}


def trace(task: str, gamma: float, phi: float, eps: float, cfg: dict, seed: int = 0) -> dict:
    """One run: per step the loss and the figures of the step (one param group)."""
    model, loss_of_step = TASKS[task](cfg, seed)
    opt = AdamL(model.parameters(), lr=LR, gamma=gamma, phi=phi, eps=eps, loss_offset=0.0,
                telemetry=True)
    out = {"loss": [], **{key: [] for key in KEYS}}
    for step in range(cfg["steps"]):
        loss = loss_of_step(step)
        loss.backward()
        opt.step(loss.detach())
        opt.zero_grad()
        (figures,) = opt.telemetry()  # one group; reading it is this loop's sync, once a step
        out["loss"].append(loss.item())
        for key in KEYS:
            out[key].append(float(figures[key]))
    return out


def describe(run: dict) -> str:
    """What one trace shows about the mode, in words, from its numbers: on which side of one
    half the SGD-like share is, and where it crosses."""
    f = run["sgd_like_fraction"]
    span = f"from {f[0]:.2f} at step 1 to {f[-1]:.2f} at the end, range {min(f):.2f}-{max(f):.2f}"
    sgd = [v >= 0.5 for v in f]
    if all(sgd):
        return f"SGD-like throughout: at least half of the elements at every step ({span})"
    if not any(sgd):
        return f"adaptive throughout: fewer than half of the elements SGD-like at every step ({span})"
    crossings = sum(a != b for a, b in zip(sgd, sgd[1:]))
    last = len(sgd) - next(k for k, v in enumerate(reversed(sgd)) if v != sgd[-1])  # 1-based
    settled = "adaptive" if not sgd[-1] else "SGD-like"
    if crossings == 1:
        return f"switches once, to {settled} at step {last + 1} ({span})"
    return (f"mixed: the share crosses one half {crossings} times; {settled} from step "
            f"{last + 1} to the end ({span})")


def run(quick: bool = False, seeds: int = 1, sweep: bool = False) -> dict:
    cfg = settings(quick)
    out = {"lr": LR, "settings": [list(s) for s in SETTINGS], "epsilons": list(EPSILONS),
           "config": cfg, "runs": {}}
    for task in TASKS:
        for gamma, phi in SETTINGS:
            for eps in EPSILONS:
                r = trace(task, gamma, phi, eps, cfg)
                r["summary"] = describe(r)
                out["runs"][f"{task}|{gamma:g}|{phi:g}|{eps:g}"] = r
    return out


def plot(result: dict, path: str) -> list[str]:
    plt = pyplot()
    tasks = list(TASKS)
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 4.2 * len(tasks)), squeeze=False)
    colors = ("tab:red", "tab:blue", "tab:green")
    styles = {EPSILONS[0]: "-", EPSILONS[1]: "--"}
    for row, task in zip(axes, tasks):
        for key, r in result["runs"].items():
            name, gamma, phi, eps = key.split("|")
            if name != task:
                continue
            setting = [f"{g:g}|{p:g}" for g, p in SETTINGS].index(f"{gamma}|{phi}")
            label = f"γ={gamma}, φ={phi}, eps={eps}"
            x = range(1, len(r["loss"]) + 1)
            for ax, series in zip(row, ("loss", "sgd_like_fraction", "update_rms")):
                ax.plot(x, r[series], color=colors[setting], ls=styles[float(eps)], lw=1.2,
                        label=label)
        for ax, title in zip(row, ("training loss", "sgd_like_fraction", "update_rms")):
            ax.set_title(f"{task}: {title}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        row[2].set_yscale("log")
        row[1].set_ylim(-0.02, 1.02)
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]
