"""Reporting: the run's header, the results table, the plot and the JSON file."""

from __future__ import annotations

import json
import os

import torch

from .cases import size_label
from .contenders import traffic_per_param
from .modes import DEFAULT, MODES


def header_lines(info: dict, dtypes, quick: bool, modes=("default",)) -> list[str]:
    """What the table's columns mean and how they were measured, and the run's warnings."""
    env = info["env"]
    out = [
        f"adaml-bench on {env['device']} ({env['device_name']}, {env['threads']} threads), "
        f"torch {env['torch_version']}, triton {env['triton_version']}, "
        f"Python {env['python_version']}{', quick' if quick else ''}",
        "Traffic model, bytes per parameter and step (each array read once, written once):",
        traffic_model_text(dtypes, modes),
        f"Timer: {info['timer']} around each full opt.step (host overhead included), after "
        "warm-up; median and p10-p90 of the timed steps; optimizers and copy interleaved in "
        "turns, each turn led by untimed steps. sets: input sets cycled so the "
        f"{info['cache_bytes'] / 2**20:.0f} MiB last-level cache never holds the previous "
        "step's data.",
        "GB/s = bytes moved / median time; %copy = GB/s / copy GB/s (read+write bytes of "
        "dst.copy_(src) on buffers of the same traffic, this run); x fused = time / torch "
        "fused Adam's time (< 1: faster); host ms = time in the Python call.",
    ]
    if env["device"] == "cpu":
        out.append("On a CPU a copy also reads each destination line before writing it "
                   "(uncounted), so an in-place optimizer step can exceed 100% of copy.")
    return out


def busy_warnings(env: dict, rows: list[dict]) -> list[str]:
    """Warnings when other processes kept the CPUs busy: CPU timings are then unreliable."""
    out = []
    busy = env.get("cpu_busy_pct_at_start")
    if busy is not None and busy > 25:
        out.append(f"WARNING: other processes kept {busy:.0f}% of the CPUs busy when the run "
                   f"started (load average {env['loadavg_1min']}); CPU timings are unreliable "
                   "on a busy box.")
    noisy = {r["case"]: r["others_cpu_pct"] for r in rows
             if (r.get("others_cpu_pct") or 0) > 10}
    if noisy:
        out.append("WARNING: other processes used a share of the CPUs while these cases ran, so "
                   "their times are unreliable: "
                   + ", ".join(f"{c} {p:.0f}%" for c, p in noisy.items()))
    return out


def traffic_model_text(dtypes, modes=("default",)) -> str:
    """Bytes per parameter of AdamL (per low-precision mode) and torch's Adam, per dtype."""
    parts = []
    for dt in dtypes:
        name = str(dt).replace("torch.", "")
        t = traffic_per_param("torch", dt)
        a = DEFAULT.traffic(dt)
        moments = "float64" if dt == torch.float64 else "float32"
        parts.append(
            f"  {name}: AdamL {a} B/param ({DEFAULT.traffic_text(dt)}; moments {moments}); "
            f"torch Adam {t} B/param (moments {name})")
        for m in modes:
            mode = MODES[m]
            if m != "default" and mode.applies(dt):
                parts.append(f"    +{m}: {mode.traffic(dt):g} B/param ({mode.traffic_text(dt)})")
    return "\n".join(parts)


def fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    width = max([14] + [len(r["backend"]) for r in rows])
    head = (f"{'case':<11} {'backend':<{width}} {'params':>13} {'tensors':>7} {'dtype':<8} "
            f"{'B/p':>5} {'median ms':>10} {'p10-p90 ms':>19} {'host ms':>9} {'GB/s':>7} "
            f"{'%copy':>6} {'x fused':>7} {'sets':>4} {'reps':>4}")
    lines = [head, "-" * len(head)]
    previous = None
    for r in rows:
        key = (r["case"], r["dtype"])
        if previous is not None and key != previous:
            lines.append("")
        if key != previous:
            lines.append(f"# {r['case']}, {r['dtype']}: copy {fmt(r['copy_gbps'], '.1f')} GB/s")
        previous = key
        left = (f"{r['case']:<11} {r['backend']:<{width}} {r['n_params']:>13,} "
                f"{r['n_tensors']:>7} {r['dtype']:<8} {r['bytes_per_param']:>5.4g}")
        if r["skipped"]:
            lines.append(f"{left}  skipped: {r['skipped']}")
            continue
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        lines.append(
            f"{left} {r['median_ms']:>10.3f} {spread:>19} {r['host_ms']:>9.3f} "
            f"{r['gbps']:>7.2f} {fmt(r['pct_of_copy'], '.1f'):>6} "
            f"{fmt(r['vs_torch_fused'], '.3f'):>7} {r['sets']:>4} {r['reps']:>4}")
    return "\n".join(lines)


def host_header_lines(info: dict, quick: bool) -> list[str]:
    """How the host-overhead case was measured, and what its columns mean."""
    env = info["env"]
    out = [
        f"adaml-bench host overhead on {env['device']} ({env['device_name']}, "
        f"{env['threads']} thread), torch {env['torch_version']}, triton "
        f"{env['triton_version']}, Python {env['python_version']}{', quick' if quick else ''}",
        "Case: N one-element parameters; before every step each parameter is handed a new "
        f"gradient tensor (a rotation of {info['grad_sets']} pre-made sets, as zero_grad() + "
        "backward() hand over new tensors), outside the timed call.",
        f"Timer: {info['timer']} around each full opt.step, after warm-up; median and p10-p90 "
        "of the timed steps; optimizers interleaved in turns. us/tensor = us/step / tensors; "
        "x fused = time / torch fused Adam's time (< 1: faster); host us = time in the "
        "Python call.",
    ]
    if env["device"] == "cuda":
        out.append("+graph rows: one AdamL step captured in a CUDA graph and replayed "
                   "(gradients fixed, no host work per step): the lower bound.")
    return out


def format_host_table(rows: list[dict]) -> str:
    head = (f"{'tensors':>7} {'backend':<14} {'dtype':<8} {'us/step':>10} {'p10-p90 us':>19} "
            f"{'host us':>9} {'us/tensor':>9} {'x fused':>7} {'reps':>5}  grads")
    lines = [head, "-" * len(head)]
    previous = None
    for r in rows:
        key = (r["n_tensors"], r["dtype"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        left = f"{r['n_tensors']:>7,} {r['backend']:<14} {r['dtype']:<8}"
        if r["skipped"]:
            lines.append(f"{left}  skipped: {r['skipped']}")
            continue
        spread = f"{r['p10_us']:.1f}-{r['p90_us']:.1f}"
        lines.append(
            f"{left} {r['us_per_step']:>10.1f} {spread:>19} {r['host_us']:>9.1f} "
            f"{r['us_per_tensor']:>9.3f} {fmt(r['vs_torch_fused'], '.3f'):>7} {r['reps']:>5}  "
            f"{r['grads']}")
    return "\n".join(lines)


def write_plot(rows: list[dict], path: str, title: str) -> str | None:
    """GB/s against parameters, one line per backend (the copy too). Returns a note if skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed, so no plot (pip install matplotlib)"
    done = [r for r in rows if r["gbps"] is not None]
    dtypes = sorted({r["dtype"] for r in done}) or ["float32"]
    fig = Figure(figsize=(7.5 * len(dtypes), 5.2))
    FigureCanvasAgg(fig)
    markers = {"gpt2_small": "s", "many_small": "^"}
    for i, dt in enumerate(dtypes):
        ax = fig.add_subplot(1, len(dtypes), i + 1)
        colors = {}
        sweep_copy = sorted({(r["n_params"], r["copy_gbps"]) for r in rows if r["kind"] == "sweep"
                             and r["dtype"] == dt and r["copy_gbps"] is not None})
        if sweep_copy:
            ax.plot(*zip(*sweep_copy), "k--", label="copy (read+write)")
        for backend in dict.fromkeys(r["backend"] for r in done if r["dtype"] == dt):
            pts = sorted((r["n_params"], r["gbps"]) for r in done
                         if r["dtype"] == dt and r["backend"] == backend and r["kind"] == "sweep")
            if pts:
                (line,) = ax.plot(*zip(*pts), "o-", label=backend)
                colors[backend] = line.get_color()
        for r in done:
            if r["dtype"] == dt and r["kind"] == "list":
                color = colors.get(r["backend"])
                if color is None:
                    (line,) = ax.plot([], [], "o-", label=r["backend"])
                    color = colors[r["backend"]] = line.get_color()
                ax.scatter([r["n_params"]], [r["gbps"]], marker=markers.get(r["case"], "D"),
                           color=color, s=50, edgecolors="black", linewidths=0.5, zorder=3)
        for case, m in markers.items():
            if any(r["case"] == case and r["dtype"] == dt for r in done):
                ax.scatter([], [], marker=m, color="white", edgecolors="black", label=case)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: size_label(int(round(x)))))
        ys = [r["gbps"] for r in done if r["dtype"] == dt] + [c for _n, c in sweep_copy]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 30:
            ax.set_yscale("log")
        ax.set_xlabel("parameters (log scale); lists: markers")
        ax.set_ylabel("GB/s under the traffic model")
        ax.set_title(f"{title}, {dt}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def write_json(path: str, rows: list[dict]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
