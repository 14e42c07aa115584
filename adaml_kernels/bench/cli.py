"""adaml-bench's command line: the options, and main() printing what the run measured."""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from .cases import DTYPES, LIST_NAMES, default_sizes, list_cases, parse_size, sweep_cases
from .contenders import ADAML_BACKENDS, TORCH_CONTENDERS
from .environment import environment
from .fsdp import format_fsdp_table, fsdp_header_lines, fsdp_ratio_lines, run_fsdp
from .goals import goal_lines, host_goal_lines
from .host_overhead import HOST_COUNTS, SMOKE_COUNTS, run_host_overhead
from .memory import format_memory_table, run_memory_check
from .memory_cpu import (
    DEFAULT_SIZE, format_memory_cpu_table, memory_cpu_header_lines, parse_mem_size,
    run_memory_cpu,
)
from .modes import MODES
from .report import (
    busy_warnings, format_host_table, format_table, header_lines, host_header_lines, write_json,
    write_plot,
)
from .run import BenchConfig, run_benchmark


def _parse_list(text: str, allowed, what: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in allowed:
            raise argparse.ArgumentTypeError(f"unknown {what} {t!r}; choose from {allowed}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaml-bench",
        description="Time AdamL's backends against torch.optim.Adam (fused, foreach): full "
                    "opt.step time, GB/s under the traffic model, % of a copy measured in the "
                    "same run, and the time relative to torch's fused Adam.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when there is one, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes and repetitions (CPU: 1M, 4M, 16M and both lists, < 2 min)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated single-tensor sizes, e.g. 1M,4M,16M (K/M/G = 2^10/20/30, "
                        "1B = 2^30), or 'none'. Default: 1M-64M on the CPU, 1M-1B on the GPU")
    p.add_argument("--dtype", default="float32",
                   help="comma-separated parameter dtypes: float32, bfloat16, float16, float64")
    p.add_argument("--lists", default="gpt2,many_small",
                   help="parameter lists to run: gpt2, many_small, or 'none'")
    p.add_argument("--backends", default=None,
                   help="only these optimizers (comma-separated): reference, triton, cpu, cuda, "
                        "torch_fused, torch_foreach. Default: every available one")
    p.add_argument("--modes", default="all",
                   help="AdamL's low-precision modes to run on each fused backend, besides the "
                        "default (comma-separated): sr, master, bf16m, bf16m+sr, "
                        "master+bf16m+sr, 8bit, telemetry (telemetry=True, beside the same "
                        "backend without it); 'all' (default) or 'default' (none). Each runs "
                        "only for the dtypes it concerns: e.g. --dtype bfloat16 runs all of "
                        "them, float32 bf16m and bf16m+sr")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s against size")
    p.add_argument("--memory-check", action="store_true",
                   help="CUDA only: instead of timing, report the peak memory one opt.step "
                        "allocates beyond the state, per optimizer (default cases: 16M, 256M "
                        "and both lists)")
    p.add_argument("--memory-cpu", action="store_true",
                   help="instead of timing, the CPU memory benchmark: peak and resident RSS of "
                        "training steps on a stack of Linear layers (--mem-size), each scenario "
                        "(steady state, a late parameter, state_dict, zero_grad) and optimizer "
                        "(AdamL cpu and reference, torch fused Adam) in a fresh process, in MB "
                        "above the baseline (model, parameters and first gradients); always "
                        "on the CPU")
    p.add_argument("--mem-size", default=DEFAULT_SIZE, metavar="LAYERSxWIDTH",
                   help=f"--memory-cpu's model: LAYERS x nn.Linear(WIDTH, WIDTH) (default "
                        f"{DEFAULT_SIZE}: 100.7M parameters, 403 MB)")
    p.add_argument("--host-overhead", nargs="?", const="default", default=None,
                   metavar="COUNTS",
                   help="instead of the size sweep, time the host-overhead case: COUNTS "
                        "one-element tensors (comma-separated, default 1,100,1000,5000) whose "
                        "gradients are replaced before every step, one CPU thread; AdamL's fused "
                        "backends (the reference only with --backends) against torch fused and "
                        "foreach Adam, in us per step and per tensor; on CUDA also a "
                        "CUDA-graph replay of an AdamL step (the lower bound)")
    p.add_argument("--fsdp", nargs="?", type=int, const=0, default=None, metavar="RANKS",
                   help="instead of the size sweep, time the FSDP2 case: a stack of Linear "
                        "layers (4.2M parameters on the CPU) sharded with fully_shard over RANKS "
                        "ranks (default 2: gloo on the CPU, nccl with one GPU per rank, as many "
                        "as there are GPUs), fresh gradients from a forward and backward before "
                        "every step; only opt.step is timed (the slowest rank), AdamL's fused "
                        "backends against torch fused and foreach Adam")
    p.add_argument("--memory-budget", type=float, default=None, metavar="FRACTION",
                   help="fraction of free memory the benchmark may use (default 0.4 CPU, 0.85 GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the kernels (torch.set_num_threads); "
                        "default: torch's default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny, for tests
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        dtypes = []
        for t in _parse_list(args.dtype, tuple(DTYPES), "dtype"):
            if DTYPES[t] not in dtypes:
                dtypes.append(DTYPES[t])
        lists = _parse_list(args.lists, LIST_NAMES, "list")
        if args.modes.strip().lower() == "all":
            modes = tuple(MODES)
        else:
            modes = ("default",) + tuple(
                m for m in _parse_list(args.modes, tuple(MODES), "mode") if m != "default")
        wanted = None if args.backends is None else _parse_list(
            args.backends, ADAML_BACKENDS + TORCH_CONTENDERS, "backend")
        counts = None
        if args.host_overhead == "default":
            counts = list(SMOKE_COUNTS if args.smoke else HOST_COUNTS)
        elif args.host_overhead is not None:
            counts = [parse_size(s) for s in args.host_overhead.split(",") if s.strip()]
        if args.sizes is not None:
            sizes = [] if args.sizes.strip().lower() == "none" else [
                parse_size(s) for s in args.sizes.split(",") if s.strip()]
        elif args.smoke:
            sizes = [1000, 4096]
        elif args.memory_check:
            sizes = [16 << 20, 256 << 20]
        else:
            sizes = default_sizes(device, args.quick)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if not dtypes:
        parser.error("--dtype: give at least one dtype")
    if counts is not None and not counts:
        parser.error("--host-overhead: give at least one tensor count")
    if sum((counts is not None, args.fsdp is not None, args.memory_check, args.memory_cpu)) > 1:
        parser.error("--host-overhead, --memory-check, --memory-cpu and --fsdp are separate "
                     "runs: choose one")
    if args.memory_cpu:
        try:
            parse_mem_size(args.mem_size)
        except ValueError as e:
            parser.error(str(e))
    if args.fsdp is not None and args.fsdp < 0:
        parser.error("--fsdp: the number of ranks must be >= 1")

    t_start = time.perf_counter()
    if args.memory_cpu:
        return _memory_cpu(args, wanted, t_start)
    if args.memory_check:
        return _memory_check(args, device, sizes, lists, dtypes, wanted, modes)
    if counts is not None:
        return _host_overhead(args, device, counts, dtypes, wanted, t_start)
    if args.fsdp is not None:
        return _fsdp(args, device, dtypes, wanted, t_start)

    cfg = BenchConfig(device, sizes, lists, dtypes, quick=args.quick, smoke=args.smoke,
                      backends=wanted, budget_fraction=args.memory_budget,
                      progress=not args.no_progress, modes=modes)
    if not cfg.sizes and not cfg.lists:
        parser.error("nothing to run: --sizes none and --lists none")
    gc.collect()
    gc.freeze()  # what is alive now stays: full collections during timing get cheap
    try:
        rows, info = run_benchmark(cfg)
    finally:
        gc.unfreeze()
    env = info["env"]
    elapsed = time.perf_counter() - t_start
    for line in header_lines(info, dtypes, args.quick, modes) + busy_warnings(env, rows):
        print(line)
    _print_notes(info)
    print()
    print(format_table(rows))
    print()
    print("Goals:")
    for line in goal_lines(rows, device):
        print(f"  {line}")
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    if args.plot:
        title = f"AdamL vs torch Adam on {env['device_name']}"
        note = write_plot(rows, args.plot, title)
        print(f"note: {note}" if note else f"wrote {args.plot}")
    print(f"done in {elapsed:.1f} s")
    return 0


def _print_notes(info: dict) -> None:
    for note in info["notes"]:
        print(f"note: {note}")


def _write_json_and_finish(args, rows, t_start, no_plot_for: str) -> None:
    """The end of a run that draws no plot: --json, a note if --plot was asked, the time."""
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"note: no plot for the {no_plot_for}")
    print(f"done in {time.perf_counter() - t_start:.1f} s")


def _host_overhead(args, device, counts, dtypes, wanted, t_start) -> int:
    gc.collect()
    gc.freeze()  # as for the sweep: full collections during timing get cheap
    try:
        rows, info = run_host_overhead(device, counts, dtypes, wanted, args.quick, args.smoke)
    finally:
        gc.unfreeze()
    for line in host_header_lines(info, args.quick) + busy_warnings(info["env"], rows):
        print(line)
    if args.threads is not None:
        print("note: --threads is ignored here: the host-overhead case runs with one thread")
    _print_notes(info)
    print()
    print(format_host_table(rows))
    print()
    print("Goals (host overhead):")
    for line in host_goal_lines(rows):
        print(f"  {line}")
    _write_json_and_finish(args, rows, t_start, no_plot_for="host-overhead case")
    return 0


def _fsdp(args, device, dtypes, wanted, t_start) -> int:
    rows, info = run_fsdp(device, dtypes, wanted, ranks=args.fsdp or None, quick=args.quick,
                          smoke=args.smoke, threads=args.threads)
    for line in fsdp_header_lines(info) + busy_warnings(info["env"], rows):
        print(line)
    _print_notes(info)
    print()
    print(format_fsdp_table(rows))
    print()
    for line in fsdp_ratio_lines(rows):
        print(line)
    _write_json_and_finish(args, rows, t_start, no_plot_for="FSDP2 case")
    return 0 if any(r["median_ms"] is not None for r in rows) else 1


def _memory_cpu(args, wanted, t_start) -> int:
    rows, info = run_memory_cpu(args.mem_size, wanted, threads=args.threads)
    for line in memory_cpu_header_lines(info):
        print(line)
    _print_notes(info)
    print()
    print(format_memory_cpu_table(rows))
    _write_json_and_finish(args, rows, t_start, no_plot_for="CPU memory benchmark")
    return 0 if any(r["value_mb"] is not None for r in rows) else 1


def _memory_check(args, device, sizes, lists, dtypes, wanted, modes) -> int:
    if device.type != "cuda":
        print("adaml-bench --memory-check needs a CUDA device (--device cuda); "
              "torch does not track peak CPU allocations", file=sys.stderr)
        return 2
    cases = sweep_cases(sizes) + list_cases(lists, smoke=args.smoke)
    rows = []
    for dt in dtypes:
        rows += run_memory_check(device, cases, dt, wanted, modes=modes)
    env = environment(device)
    print(f"adaml-bench memory check on {env['device_name']} (torch {env['torch_version']}, "
          f"triton {env['triton_version']})")
    print("extra peak bytes: max_memory_allocated during one opt.step (after 2 warm-up steps)"
          " minus memory_allocated before it; state MB: what the optimizer allocated.")
    print(format_memory_table(rows))
    if args.json:
        write_json(args.json, rows)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
