"""docs/telemetry_results.md: the page `adaml-experiments telemetry --page docs` writes from its
run. Every number and every sentence about the modes comes from the run that wrote it."""

from __future__ import annotations

import datetime

from .pages import generated_notice, write_page


def write(result: dict, docs: str, command: str) -> list[str]:
    from . import telemetry

    return write_page(docs, "telemetry_results.md", "telemetry_modes.png", lambda path: telemetry.plot(result, path),
                      lambda figure: render(result, figure, command))


def render(result: dict, figure: str, command: str) -> str:
    meta = result["meta"]
    machine = meta["machine"]
    cfg = result["config"]
    out = []
    w = out.append
    w("# AdamL's modes, seen through its telemetry\n")
    out.extend(generated_notice(command))
    w(f"It last ran on {datetime.date.today().isoformat()}: {machine['platform']}, "
      f"{machine['cpus']} CPUs ({machine['processor']}), no GPU, torch {machine['torch']}; "
      f"AdamL's backend: **{machine['adaml_backend']}**. Wall time {meta['seconds']:.0f} s."
      + (" **Quick mode: smoke-test budgets, not results.**" if meta["quick"] else "") + "\n")
    w("AdamL's w is b2 w + (1 - b2) g^2 / (gamma l^phi) + eps l. Where eps l is the larger term "
      "(`sgd_like_fraction`, docs/telemetry.md) the element steps like SGD with momentum, with "
      "a step of about lr m sqrt((1 - b2) / (eps l)); elsewhere like Adam. An element switches "
      "where l^(phi + 1) = (1 - b2) g^2 / (gamma eps).\n")
    w(f"Runs: the char LSTM of results.md (embedding {cfg['lstm']['embed']}, hidden "
      f"{cfg['lstm']['hidden']}) and the GPT example (d_model {cfg['gpt']['d_model']}, "
      f"{cfg['gpt']['layers']} layers, batches of {cfg['gpt_batch']} sequences of "
      f"{cfg['gpt_seq']} bytes), {cfg['steps']} steps each at lr {result['lr']:g}, float32, "
      "cross-entropy loss with f* = 0, one seed per setting (each curve is one run). The "
      "figures are read after every step.\n")
    w(f"![loss, sgd_like_fraction and update_rms per step]({figure})\n")
    w("| model | gamma | phi | eps | SGD-like share, step 1 | at the end | below 1/2 from step | "
      "final loss | update_rms at the end |")
    w("|---|---|---|---|---|---|---|---|---|")
    for key, r in result["runs"].items():
        task, gamma, phi, eps = key.split("|")
        f = r["sgd_like_fraction"]
        below = next((k + 1 for k, v in enumerate(f) if v < 0.5), None)
        w(f"| {task} | {gamma} | {phi} | {eps} | {f[0]:.3f} | {f[-1]:.3f} | "
          f"{below if below is not None else 'never'} | {r['loss'][-1]:.3f} | "
          f"{r['update_rms'][-1]:.2e} |")
    w("")
    w("## What these runs show\n")
    for key, r in result["runs"].items():
        task, gamma, phi, eps = key.split("|")
        w(f"- {task}, gamma {gamma}, phi {phi}, eps {eps}: {r['summary']}.")
    w("")
    w(_reading(result) + "\n")
    return "\n".join(out)


def _reading(result: dict) -> str:
    """How eps and (gamma, phi) move the share, from the table's numbers."""
    lines = []
    for task in sorted({k.split("|")[0] for k in result["runs"]}):
        runs = {tuple(k.split("|")[1:]): r for k, r in result["runs"].items()
                if k.startswith(task + "|")}
        by_eps, steady = {}, {}
        for (gamma, phi, eps), r in runs.items():
            f = r["sgd_like_fraction"]
            by_eps.setdefault(eps, []).append(sum(f) / len(f))
            steady.setdefault(eps, []).append(min(f) >= 0.5)
        means = ", ".join(f"eps {eps}: {sum(v) / len(v):.2f}" for eps, v in by_eps.items())
        lines.append(f"{task}: the SGD-like share averaged over steps and settings is {means}.")
        for eps, flags in steady.items():
            if all(flags):
                lines.append(f"At eps {eps} every {task} run stays SGD-like at every step, for "
                             "all three (gamma, phi): in these runs AdamL does not switch to its "
                             "adaptive mode.")
            elif not any(flags):
                lines.append(f"At eps {eps} no {task} run stays SGD-like throughout.")
            else:
                lines.append(f"At eps {eps}, {sum(flags)} of the {len(flags)} {task} runs stay "
                             "SGD-like at every step.")
    return " ".join(lines)
