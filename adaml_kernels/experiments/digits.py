"""A small CNN on scikit-learn's bundled 8x8 digits (1797 images, no download).

AdamL runs at a constant learning rate; Adam, EAdam and AdaBelief get the paper's step decay
(lr x 0.1 for the last quarter of the epochs, as the 150-of-200-epoch decay on CIFAR-10). Adam at
a constant lr is added as a control: it shows what the decay itself is worth here. The train/test
split is fixed; seeds change the initialisation and the batch order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .common import (
    OPTIMIZERS, curve_stats, heatmap, make_optimizer, mean_std, plot_band, pyplot,
    seed_everything, step, verdict,
)

LR = 1e-2
BATCH = 64
DECAY_AT = 0.75  # fraction of the epochs after which the baselines' lr is multiplied by 0.1
CONTROL = "Adam (no decay)"


def settings(quick: bool) -> dict:
    if quick:
        return dict(epochs=3, gammas=(0.1, 1.0), phis=(1.0, 2.0), sweep_epochs=1, sweep_seeds=1,
                    train_subset=256)
    return dict(epochs=20, gammas=(0.1, 1.0, 10.0, 100.0), phis=(0.5, 1.0, 2.0, 4.0),
                sweep_epochs=20, sweep_seeds=1, train_subset=None)


def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # N x 1 x 8 x 8 in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0,
                                           stratify=d.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 4 x 4
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 2 x 2
        nn.Flatten(), nn.Linear(128, 10),
    )


def train(opt_name: str, seed: int, epochs: int, data, decay: bool, gamma=1.0, phi=1.0) -> dict:
    """Train one model; returns per-epoch test accuracy and mean train loss."""
    x_tr, y_tr, x_te, y_te = data
    gen = seed_everything(seed)
    model = make_model()
    kw = dict(gamma=gamma, phi=phi, loss_offset=0.0) if opt_name == "AdamL" else {}
    opt = make_optimizer(opt_name, model.parameters(), LR, **kw)
    sched = None
    if decay:
        milestone = max(1, int(DECAY_AT * epochs))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[milestone], gamma=0.1)
    loss_fn = nn.CrossEntropyLoss()  # >= 0, so AdamL's f* = 0
    acc, train_loss = [], []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        total = 0.0
        for i in range(0, len(perm), BATCH):
            b = perm[i:i + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(x_tr[b]), y_tr[b])
            loss.backward()
            step(opt, loss)
            total += loss.item() * len(b)
        if sched is not None:
            sched.step()
        train_loss.append(total / len(y_tr))
        model.eval()
        with torch.no_grad():
            acc.append((model(x_te).argmax(1) == y_te).float().mean().item())
    return {"test_acc": acc, "train_loss": train_loss}


def run(quick: bool = False, seeds: int = 3, sweep: bool = True) -> dict:
    cfg = settings(quick)
    data = load_data()
    if cfg["train_subset"]:  # --quick: a smoke test on a slice of the training set
        n = cfg["train_subset"]
        data = (data[0][:n], data[1][:n], data[2], data[3])
    out = {"lr": LR, "batch": BATCH, "decay_at_epoch": max(1, int(DECAY_AT * cfg["epochs"])),
           "n_train": len(data[1]), "n_test": len(data[3]), "seeds": seeds, **cfg, "runs": {}}
    names = list(OPTIMIZERS) + [CONTROL]
    for name in names:
        decay = name not in ("AdamL", CONTROL)
        runs = [train(name, s, cfg["epochs"], data, decay) for s in range(seeds)]
        final = [r["test_acc"][-1] for r in runs]
        best = [max(r["test_acc"]) for r in runs]
        out["runs"][name] = {
            "decay": decay,
            "test_acc": curve_stats([r["test_acc"] for r in runs]),
            "train_loss": curve_stats([r["train_loss"] for r in runs]),
            "final_acc": final, "final_acc_mean_std": mean_std(final),
            "best_acc_mean_std": mean_std(best),
        }
    adaml = out["runs"]["AdamL"]["final_acc"]
    out["verdicts"] = {n: verdict(adaml, out["runs"][n]["final_acc"], higher_is_better=True)
                       for n in names if n != "AdamL"}
    if sweep:
        out["sweep"] = _sweep(cfg, data)
    return out


def _sweep(cfg: dict, data) -> dict:
    """Final test accuracy of AdamL (constant lr) over gamma x phi; rows phi, columns gamma."""
    acc = [[float(np.mean([train("AdamL", s, cfg["sweep_epochs"], data, False, gamma, phi)
                           ["test_acc"][-1] for s in range(cfg["sweep_seeds"])]))
            for gamma in cfg["gammas"]] for phi in cfg["phis"]]
    return {"gammas": list(cfg["gammas"]), "phis": list(cfg["phis"]),
            "epochs": cfg["sweep_epochs"], "seeds": cfg["sweep_seeds"], "final_acc": acc}


def plot(result: dict, path: str) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, result["epochs"] + 1)
    for name, r in result["runs"].items():
        label = name + ("" if name == "AdamL" or not r["decay"] else " (step decay)")
        plot_band(axes[0], epochs, r["test_acc"], name)
        axes[0].lines[-1].set_label(label)
        plot_band(axes[1], epochs, r["train_loss"], name)
    axes[0].set_ylim(max(0.0, min(min(r["test_acc"]["mean"][-1] for r in result["runs"].values())
                                  - 0.05, 0.9)), 1.0)
    axes[0].set_title(f"digits CNN: test accuracy (mean ± std, {result['seeds']} seeds)",
                      fontsize=10)
    axes[1].set_yscale("log")
    axes[1].set_title("train loss (epoch mean)", fontsize=10)
    for ax in axes:
        ax.axvline(result["decay_at_epoch"] + 0.5, color="k", ls=":", lw=0.8)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written = [path]
    if "sweep" in result:
        sw = result["sweep"]
        fig, ax = plt.subplots(figsize=(5, 4))
        heatmap(ax, sw["final_acc"], sw["gammas"], sw["phis"], "gamma", "phi",
                f"digits: AdamL final test accuracy\n(lr={result['lr']:g}, {sw['epochs']} epochs, "
                f"{sw['seeds']} seed{'s' if sw['seeds'] > 1 else ''})", fmt="{:.3f}")
        fig.tight_layout()
        sweep_path = path.rsplit(".", 1)[0] + "_sweep.png"
        fig.savefig(sweep_path, dpi=80)
        plt.close(fig)
        written.append(sweep_path)
    return written
