"""docs/precision.md: the page `adaml-experiments precision --page docs` writes from its run.
Every number on it comes from the run that wrote it."""

from __future__ import annotations

import datetime

from .pages import generated_notice, write_page


def write(result: dict, docs: str, command: str) -> list[str]:
    from . import precision

    return write_page(docs, "precision.md", "precision.png", lambda path: precision.plot(result, path),
                      lambda figure: render(result, figure, command))


def _kb(n: int) -> str:
    return f"{n / 1024:.0f} KiB"


def render(result: dict, figure: str, command: str) -> str:
    meta = result["meta"]
    machine = meta["machine"]
    quick = meta["quick"]
    out = []
    w = out.append
    w("# Low-precision training with AdamL\n")
    out.extend(generated_notice(command))
    w(f"It last ran on {datetime.date.today().isoformat()}: {machine['platform']}, "
      f"{machine['cpus']} CPUs ({machine['processor']}), no GPU, Python {machine['python']}, "
      f"torch {machine['torch']} with {machine['torch_threads']} thread(s); AdamL's backend "
      f"(`auto`): **{machine['adaml_backend']}**. Wall time {meta['seconds']:.0f} s."
      + (" **Quick mode: smoke-test budgets, not results.**" if quick else "") + "\n")
    w("The options are AdamL's `stochastic_rounding=`, `master_weights=` and `state_dtype=` "
      "(docs/low_precision.md).\n")

    w("## The issue's check: a bf16 weight at 1.0, lr 1e-3, gradient 1, 100 steps\n")
    w("4,096 such weights, each stepped alone (Adam's step is about lr, so fp32 ends near 0.90):\n")
    w("| | mean | std | min | max |")
    w("|---|---|---|---|---|")
    for name, r in result["walk"].items():
        w(f"| {name} | {r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f} | {r['max']:.4f} |")
    w("")
    stuck = result["walk"]["bf16, round to nearest"]
    if stuck["min"] == stuck["max"] == 1.0:
        w("Rounded to nearest, every update (1e-3) is below half a bf16 ulp at 1.0 (2^-9 below "
          "1), so the weights never move. Stochastic rounding moves them by the fp32 step on "
          "average (each weight is a random walk around the fp32 path); the master weight moves "
          "exactly as fp32 and the bf16 weight is its rounding.\n")

    w("## Char LSTM\n")
    w(f"The char LSTM of [results.md](results.md) (embedding {result['embed']}, hidden "
      f"{result['hidden']}, vocabulary {result['vocab']}, batches of {result['batch']} windows "
      f"of {result['seq']} characters from Python's bundled help texts), trained by AdamL for "
      f"{result['steps']} steps at a constant lr, {result['seeds']} seeds (the same seeds, "
      "initial weights and batches for every mode); validation loss (cross-entropy in nats "
      f"per character) on {result['val_chars']:,} held-out characters every "
      f"{result['eval_every']} steps. bf16 runs keep the whole model in bf16: weights, "
      "activations and gradients (the loss is computed in float32 from the bf16 logits). So "
      "fp32 against any bf16 run also compares the arithmetic of the forward and backward "
      "passes; among the bf16 runs only the optimizer's storage differs. \"Same as fp32\" "
      "means the means differ by at most the larger of the two standard deviations.\n")
    w(f"![validation loss per mode]({figure})\n")
    for lr, runs in result["by_lr"].items():
        base = runs["fp32"]["final_loss_mean_std"][0]
        w(f"### lr = {float(lr):g}\n")
        w("| mode | optimizer state | final validation loss | vs fp32 | verdict | "
          "exp_avg_sq vs fp32 | time |")
        w("|---|---|---|---|---|---|---|")
        for name, r in runs.items():
            m, s = r["final_loss_mean_std"]
            w(f"| {name} | {_kb(r['state_bytes'])} | {m:.4f} ± {s:.4f} | "
              f"{m - base:+.4f} | {r['verdict']} | {r['exp_avg_sq_vs_fp32']:.2f} | "
              f"{r['seconds']:.0f} s |")
        w("")
        w(_reading(runs) + "\n")
    w("Optimizer state counts `exp_avg`, `exp_avg_sq`, `master_param` and the 8-bit moments' "
      "block scales (the step counts and "
      "f_1 are a few bytes). \"exp_avg_sq vs fp32\": the median of the final `exp_avg_sq` over "
      "all weights (mean over seeds) over the fp32 run's. Times are the training loops of all "
      "seeds on this machine (the bf16 runs were faster here; where the time goes was not "
      "profiled).\n")
    return "\n".join(out)


def _reading(runs: dict) -> str:
    """A plain reading of one lr's table, from its numbers."""
    fp32 = runs["fp32"]["final_loss_mean_std"][0]
    parts = []
    for name in ("bf16, round to nearest", "bf16 + stochastic rounding",
                 "bf16 + master weights", "fp32 + bf16 moments", "fp32 + bf16 moments + SR",
                 "fp32 + 8-bit moments", "fp32 + 8-bit moments + SR"):
        r = runs[name]
        parts.append(f"{name}: {r['verdict']} ({r['final_loss_mean_std'][0] - fp32:+.4f})")
    text = "Against fp32: " + "; ".join(parts) + "."
    nearest8 = runs["fp32 + 8-bit moments"]["final_loss_mean_std"][0]
    stochastic8 = runs["fp32 + 8-bit moments + SR"]["final_loss_mean_std"][0]
    text += (f" 8-bit moments end {100 * (stochastic8 / fp32 - 1):+.2f}% from fp32's final "
             f"loss with stochastic rounding and {100 * (nearest8 / fp32 - 1):+.2f}% rounded to "
             f"nearest (goal: within 2%), with "
             f"{runs['fp32 + 8-bit moments']['state_bytes']:,} bytes of state against fp32's "
             f"{runs['fp32']['state_bytes']:,}.")
    nearest = runs["fp32 + bf16 moments"]
    if nearest["verdict"] != "same as fp32":
        ratio = nearest["exp_avg_sq_vs_fp32"]
        text += (" bf16 moments rounded to nearest change the optimizer itself, not only its "
                 "precision: each step moves exp_avg_sq by (1 - beta2) = 0.1% of (g^2 - "
                 "exp_avg_sq), less than half a bf16 ulp (about 0.2% of it) unless g^2 is far "
                 "off, so most moves are lost: exp_avg_sq ends at "
                 f"{ratio:.2f} times fp32's here, and AdamL's steps are about "
                 f"{ratio ** -0.5:.1f} times larger. At these small learning rates that trains "
                 "faster; it is a different step size, not better precision. With stochastic "
                 "rounding exp_avg_sq follows fp32's ("
                 f"{runs['fp32 + bf16 moments + SR']['exp_avg_sq_vs_fp32']:.2f}).")
    return text
