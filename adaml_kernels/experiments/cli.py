"""adaml-experiments: run the paper-reproduction experiments, or all of them into docs/results.md.

    adaml-experiments functions [--quick] [--seeds N] [--json PATH] [--plot PATH] [--no-sweep]
    adaml-experiments digits    ...   (same options)
    adaml-experiments lstm      ...   (--no-sweep is accepted and changes nothing)
    adaml-experiments wgan      ...
    adaml-experiments report [--quick] [--seeds N] [--docs DIR] [--json-dir DIR]
    adaml-experiments precision [--quick] [--seeds N] [--json PATH] [--plot PATH] [--page DIR]
                                (low-precision training; --page docs writes docs/precision.md)
    adaml-experiments telemetry [--quick] [--json PATH] [--plot PATH] [--page DIR]
                                (AdamL's modes; --page docs writes docs/telemetry_results.md)

--plot PATH writes PATH and, where there is a gamma x phi sweep, PATH_sweep.png beside it.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import report
from .runner import EXPERIMENTS, machine, run_experiment, summary, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaml-experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in EXPERIMENTS.items():
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        _common_options(p)
        p.add_argument("--json", metavar="PATH", help="write the results as JSON")
        p.add_argument("--plot", metavar="PATH", help="write the figure (PNG)")
        p.add_argument("--no-sweep", action="store_true", help="skip the gamma x phi sweep")
    _page_parser(sub, "precision", "the char LSTM in fp32, bf16 (round to nearest, stochastic "
                 "rounding, master weights) and with bf16 moments", "precision.md", "precision.png")
    _page_parser(sub, "telemetry", "AdamL's SGD-like and adaptive modes, read from its "
                 "telemetry, at three (gamma, phi) and two eps",
                 "telemetry_results.md", "telemetry_modes.png")
    p = sub.add_parser("report", help="run every experiment and write DIR/results.md")
    _common_options(p)
    p.add_argument("--docs", default="docs", metavar="DIR", help="results.md and PNGs (docs)")
    p.add_argument("--json-dir", default="out/experiments", metavar="DIR",
                   help="the JSON results (out/experiments)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)  # the models are tiny: more threads only add overhead
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    if seeds < 1:
        parser.error("--seeds must be >= 1")

    if args.command == "report":
        command = "adaml-experiments " + " ".join(sys.argv[1:] if argv is None else argv)
        report.build(args.docs, args.json_dir, quick=args.quick, seeds=seeds, command=command)
        return 0

    if args.command == "precision":
        return _precision(args, seeds, argv)
    if args.command == "telemetry":
        return _telemetry(args, argv)

    result = run_experiment(args.command, args.quick, seeds, sweep=not args.no_sweep)
    if args.json:
        write_json(result, args.json)
    if args.plot:
        for path in EXPERIMENTS[args.command].plot(result, args.plot):
            print(f"wrote {path}")
    print(summary(args.command, result))
    return 0


def _precision(args, seeds: int, argv) -> int:
    from . import precision, precision_page

    result = _run_with_page("precision", precision, precision_page, args, argv,
                            quick=args.quick, seeds=seeds)
    for lr, runs in result["by_lr"].items():
        for name, r in runs.items():
            m, s = r["final_loss_mean_std"]
            print(f"  lr {float(lr):g}  {name:28s} final loss {m:.4f} ± {s:.4f}  "
                  f"({r['vs_fp32']:+.4f} vs fp32, {r['verdict']})")
    return 0


def _telemetry(args, argv) -> int:
    from . import telemetry, telemetry_page

    result = _run_with_page("telemetry", telemetry, telemetry_page, args, argv, quick=args.quick)
    for key, r in result["runs"].items():
        print(f"  {key:28s} {r['summary']}")
    return 0


def _run_with_page(name: str, experiment, page, args, argv, **run_kwargs) -> dict:
    """An experiment that has a generated page: run it, record its time and machine, write
    what --json, --plot and --page ask for, and print its time."""
    start = time.perf_counter()
    result = experiment.run(**run_kwargs)
    result["meta"] = {"experiment": name, "quick": args.quick,
                      "seconds": time.perf_counter() - start, "machine": machine()}
    if args.json:
        write_json(result, args.json)
    if args.plot:
        for path in experiment.plot(result, args.plot):
            print(f"wrote {path}")
    if args.page:
        command = "adaml-experiments " + " ".join(sys.argv[1:] if argv is None else argv)
        for path in page.write(result, args.page, command):
            print(f"wrote {path}")
    print(f"{name}: {result['meta']['seconds']:.1f} s")
    return result


def _page_parser(sub, name: str, help: str, page: str, figure: str) -> None:
    p = sub.add_parser(name, help=help)
    _common_options(p)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write the figure (PNG)")
    p.add_argument("--page", metavar="DIR", help=f"write DIR/{page} and DIR/{figure}")


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a few seconds: a smoke test")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; 2 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


if __name__ == "__main__":
    sys.exit(main())
