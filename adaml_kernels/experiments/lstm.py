"""A character-level LSTM language model on the help texts that ship with Python.

The corpus is pydoc_data.topics (the text behind help('topics'); about 465k characters): the
first 90% is for training, the last 10% for validation. Each step trains on a batch of random
windows; the validation perplexity exp(mean cross-entropy) is measured on fixed windows. Every
optimizer runs at the same constant lr (no schedule): the paper's no-decay claim is about CNNs.

EAdam, AdaBelief and AdamL add eps to the second moment at every step, so it never falls below
about eps/(1-b2) (AdamL: eps*l/(1-b2)); many LSTM gradient entries are smaller than that floor.
The experiment therefore runs twice: at the shared default eps = 1e-8, and at EPS_ABLATION
(AdaBelief's own implementation defaults to 1e-16 for the same reason).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .common import (
    EPS, OPTIMIZERS, curve_stats, make_optimizer, mean_std, plot_band, pyplot, seed_everything,
    step, verdict,
)

LR = 1e-2
SEQ = 48
BATCH = 32
EPS_ABLATION = 1e-12


def settings(quick: bool) -> dict:
    if quick:
        return dict(steps=30, eval_every=15, hidden=32, embed=16, val_chars=2048)
    return dict(steps=400, eval_every=40, hidden=64, embed=32, val_chars=16384)


def load_text() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], vocab


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def _windows(ids: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(SEQ + 1)
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


def train(opt_name: str, seed: int, cfg: dict, data, eps: float = EPS) -> dict:
    train_ids, val_ids, vocab = data
    gen = seed_everything(seed)
    model = CharLSTM(len(vocab), cfg["embed"], cfg["hidden"])
    kw = dict(loss_offset=0.0) if opt_name == "AdamL" else {}  # cross-entropy >= 0
    opt = make_optimizer(opt_name, model.parameters(), LR, eps=eps, **kw)
    val = val_ids[: cfg["val_chars"] + 1]
    val_starts = torch.arange(0, len(val) - SEQ - 1, SEQ)  # disjoint windows, the same for all
    loss_fn = nn.CrossEntropyLoss()
    steps, val_ppl, train_loss = [], [], []
    running = []
    for k in range(1, cfg["steps"] + 1):
        x, y = _windows(train_ids, torch.randint(0, len(train_ids) - SEQ - 1, (BATCH,),
                                                  generator=gen))
        opt.zero_grad()
        loss = loss_fn(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        step(opt, loss)
        running.append(loss.item())
        if k % cfg["eval_every"] == 0 or k == cfg["steps"]:
            with torch.no_grad():
                xv, yv = _windows(val, val_starts)
                ce = loss_fn(model(xv).flatten(0, 1), yv.flatten()).item()
            steps.append(k)
            val_ppl.append(math.exp(ce))
            train_loss.append(float(np.mean(running)))
            running = []
    return {"steps": steps, "val_ppl": val_ppl, "train_loss": train_loss}


def run(quick: bool = False, seeds: int = 3, sweep: bool = False) -> dict:
    cfg = settings(quick)
    data = load_text()
    out = {"lr": LR, "seq": SEQ, "batch": BATCH, "vocab": len(data[2]),
           "train_chars": len(data[0]), "seeds": seeds, "eps": EPS, **cfg}
    out.update(_compare(cfg, data, seeds, EPS))
    out["steps_axis"] = out["runs"]["AdamL"]["steps"]
    out["eps_ablation"] = {"eps": EPS_ABLATION, **_compare(cfg, data, seeds, EPS_ABLATION)}
    return out


def _compare(cfg: dict, data, seeds: int, eps: float) -> dict:
    """Every optimizer at this eps: curves, final perplexities and AdamL's verdicts."""
    out = {}
    for name in OPTIMIZERS:
        runs = [train(name, s, cfg, data, eps) for s in range(seeds)]
        final = [r["val_ppl"][-1] for r in runs]
        best = [min(r["val_ppl"]) for r in runs]
        out[name] = {
            "steps": runs[0]["steps"],
            "val_ppl": curve_stats([r["val_ppl"] for r in runs]),
            "train_loss": curve_stats([r["train_loss"] for r in runs]),
            "final_ppl": final, "final_ppl_mean_std": mean_std(final),
            "best_ppl_mean_std": mean_std(best),
        }
    adaml = out["AdamL"]["final_ppl"]
    verdicts = {n: verdict(adaml, out[n]["final_ppl"], higher_is_better=False)
                for n in OPTIMIZERS if n != "AdamL"}
    return {"runs": out, "verdicts": verdicts}


def plot(result: dict, path: str) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    x = result["steps_axis"]
    for ax, part in zip(axes, (result, result["eps_ablation"])):
        for name, r in part["runs"].items():
            plot_band(ax, x, r["val_ppl"], name)
        ax.set_yscale("log")
        ax.set_title(f"char LSTM: validation perplexity, eps = {part.get('eps', result['eps']):g}"
                     f"\n(mean ± std, {result['seeds']} seeds)", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]
