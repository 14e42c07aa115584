"""The CPU memory benchmark: peak and resident RSS of training steps, one fresh process a case.

    adaml-bench --memory-cpu [--mem-size 24x2048] [--backends cpu,reference,torch_fused]

torch does not track CPU allocations, and a process's peak RSS cannot be taken back, so every
(scenario, optimizer) pair runs in its own Python process (``worker_main``), which reads VmRSS
and VmHWM from /proc/self/status and resets VmHWM to the current RSS (``5`` written to
/proc/self/clear_refs, Linux >= 4.0) just before the part it measures. Where the reset fails the
peak is the process's peak since it started, and the rows say so (``hwm_reset``: false).

The model: LAYERS x nn.Linear(WIDTH, WIDTH) in an nn.Sequential, float32 (24 x 2048: 100.7M
parameters, 403 MB), a batch of 32 random rows and an MSE loss against random targets. The
baseline is the VmRSS after the model was built, its first forward and backward left a .grad on
every parameter (the gradients of step 1) and gc.collect() ran, before the optimizer exists: it
holds the interpreter and torch, the parameters and the gradients. A step is forward, backward,
opt.step (AdamL: opt.step(loss)), opt.zero_grad(set_to_none=True); step 1 steps the gradients of
the baseline.

Scenarios (the rows; MB = 2^20 bytes):
    steady_peak      peak RSS during steps 2-4, minus the baseline
    steady_resident  RSS after the zero_grad of step 4, minus the baseline
    late_param       a 10-element parameter is in the group from the start but gets its first
                     gradient at step 5 (after steps 1-4): the peak of step 5 minus the peak of
                     steps 2-4 (the previous steady state)
    state_dict       after steps 1-4, the peak while opt.state_dict() runs, minus the baseline
    zero_grad        after steps 1-4 (the opt.step of step 4 and then its zero_grad measured
                     apart), the RSS after zero_grad(set_to_none=True), minus the baseline; the
                     detail says how much the zero_grad call released
steady_peak and steady_resident come from one process; each other scenario has its own.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import backends
from ..optimizer import AdamL
from .environment import environment, free_memory_bytes

# AdamL's backends (cpu+8bit: the cpu backend with 8-bit moments), then the baseline.
OPTIMIZERS = ("cpu", "cpu+8bit", "reference", "torch_fused")
SCENARIOS = ("steady", "late_param", "state_dict", "zero_grad")  # one process each
ROWS = ("steady_peak", "steady_resident", "late_param", "state_dict", "zero_grad")
DEFAULT_SIZE = "24x2048"
BATCH = 32
LATE_NUMEL = 10
LR = 1e-3
MB = float(1 << 20)
RESULT_TAG = "ADAML_MEMORY_CPU "
RELATIVE_TO = {"steady_peak": "baseline", "steady_resident": "baseline",
               "late_param": "steady peak", "state_dict": "baseline", "zero_grad": "baseline"}


def parse_mem_size(text: str) -> tuple[int, int]:
    """'24x2048' -> (24, 2048): LAYERS x nn.Linear(WIDTH, WIDTH)."""
    try:
        layers, width = (int(t) for t in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mem-size {text!r}: expected LAYERSxWIDTH, e.g. 24x2048") from None
    if layers < 1 or width < 1:
        raise ValueError(f"--mem-size {text!r}: layers and width must be >= 1")
    return layers, width


# ----------------------------------------------------------------------------- in the worker

def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def rss_bytes() -> int:
    return _status_kb()["VmRSS"] * 1024


def hwm_bytes() -> int:
    return _status_kb()["VmHWM"] * 1024


def reset_hwm() -> bool:
    """Set VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _make_optimizer(name: str, params):
    if name == "torch_fused":
        return torch.optim.Adam(params, lr=LR, fused=True)
    backend, _, mode = name.partition("+")
    return AdamL(params, lr=LR, backend=backend,
                 **(dict(state_dtype=torch.uint8) if mode == "8bit" else {}))


def _backward(model, x, y, late=None) -> torch.Tensor:
    loss = torch.nn.functional.mse_loss(model(x), y)
    if late is not None:
        loss = loss + late.square().sum()
    loss.backward()
    return loss.detach()


def measure(scenario: str, optimizer: str, layers: int, width: int) -> dict:
    """Run one scenario with one optimizer in this process; byte counts (see the module doc)."""
    torch.manual_seed(0)
    rss_start = rss_bytes()
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    params = list(model.parameters())
    late = torch.nn.Parameter(torch.zeros(LATE_NUMEL)) if scenario == "late_param" else None
    x, y = torch.randn(BATCH, width), torch.randn(BATCH, width)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    loss = _backward(model, x, y)  # the gradients of step 1
    gc.collect()
    out = {"rss_start": rss_start, "param_bytes": param_bytes, "baseline": rss_bytes()}
    opt = _make_optimizer(optimizer, params + ([late] if late is not None else []))

    def step(loss):
        if optimizer == "torch_fused":
            opt.step()
        else:
            opt.step(loss)

    step(loss)  # step 1
    opt.zero_grad(set_to_none=True)
    reset = reset_hwm()
    for i in range(2, 5):
        loss = _backward(model, x, y)
        step(loss)
        if scenario == "zero_grad" and i == 4:
            out["before_zero_grad"] = rss_bytes()
        opt.zero_grad(set_to_none=True)
    out["steady_peak"] = hwm_bytes()
    out["steady_resident"] = rss_bytes()
    if scenario == "late_param":
        reset = reset_hwm() and reset
        loss = _backward(model, x, y, late)  # step 5: the late parameter's first gradient
        assert late.grad is not None
        step(loss)
        opt.zero_grad(set_to_none=True)
        out["late_peak"] = hwm_bytes()
        out["late_resident"] = rss_bytes()
    elif scenario == "state_dict":
        gc.collect()
        out["before_state_dict"] = rss_bytes()
        reset = reset_hwm() and reset
        sd = opt.state_dict()
        out["state_dict_peak"] = hwm_bytes()
        out["state_dict_held"] = rss_bytes()
        del sd
    elif scenario == "zero_grad":
        out["after_zero_grad"] = out["steady_resident"]
    out["hwm_reset"] = reset
    return out


def worker_main(argv: list[str]) -> int:
    """python -c '...worker_main(sys.argv[1:])' SCENARIO OPTIMIZER LAYERS WIDTH [THREADS]."""
    scenario, optimizer, layers, width = argv[0], argv[1], int(argv[2]), int(argv[3])
    if len(argv) > 4 and int(argv[4]) > 0:
        torch.set_num_threads(int(argv[4]))
    result = measure(scenario, optimizer, layers, width)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------- in the parent

_WORKER_CODE = ("import sys; from adaml_kernels.bench.memory_cpu import worker_main; "
                "sys.exit(worker_main(sys.argv[1:]))")


def _run_worker(scenario: str, optimizer: str, layers: int, width: int, threads: int | None,
                timeout: float) -> dict:
    """One fresh process: its measure() result, or {"error": ...}."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-c", _WORKER_CODE, scenario, optimizer, str(layers), str(width),
           str(threads or 0)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"error": f"worker failed (rc {proc.returncode}): {tail}"[:300]}


def _rows_of(scenario: str, optimizer: str, r: dict) -> list[dict]:
    """The table rows one worker's result gives: value in bytes, what it is relative to."""
    names = {"steady": ("steady_peak", "steady_resident")}.get(scenario, (scenario,))
    rows = []
    for name in names:
        row = {"scenario": name, "optimizer": optimizer, "relative_to": RELATIVE_TO[name],
               "value_bytes": None, "value_mb": None, "vs_torch_fused": None, "detail": "",
               "skipped": r.get("error"), "raw": {k: v for k, v in r.items() if k != "error"}}
        if row["skipped"] is None:
            b = r["baseline"]
            if name == "steady_peak":
                v = r["steady_peak"] - b
            elif name == "steady_resident":
                v = r["steady_resident"] - b
            elif name == "late_param":
                v = r["late_peak"] - r["steady_peak"]
                row["detail"] = f"late-step peak {(r['late_peak'] - b) / MB:.1f} MB above baseline"
            elif name == "state_dict":
                v = r["state_dict_peak"] - b
                row["detail"] = (f"{(r['state_dict_peak'] - r['before_state_dict']) / MB:+.1f} MB "
                                 "over the RSS before the call")
            else:
                v = r["after_zero_grad"] - b
                row["detail"] = (f"zero_grad released "
                                 f"{(r['before_zero_grad'] - r['after_zero_grad']) / MB:.1f} MB")
            if not r.get("hwm_reset", True) and name != "steady_resident":
                row["detail"] = (row["detail"] + "; " if row["detail"] else "") + \
                    "peak since process start (VmHWM reset failed)"
            row["value_bytes"], row["value_mb"] = v, round(v / MB, 2)
        rows.append(row)
    return rows


def _add_ratios(rows: list[dict], param_bytes: int) -> None:
    """x torch fused: the value over torch fused Adam's for the same scenario, where torch's
    value is positive and at least 1 MB and 1% of the parameters' bytes (below that, e.g.
    torch's late_param, which is about 0, a ratio is noise)."""
    floor = max(1.0, 0.01 * param_bytes / MB)
    torch_values = {r["scenario"]: r["value_mb"] for r in rows
                    if r["optimizer"] == "torch_fused" and r["value_mb"] is not None}
    for r in rows:
        t = torch_values.get(r["scenario"])
        if r["value_mb"] is not None and t is not None and t >= floor:
            r["vs_torch_fused"] = round(r["value_mb"] / t, 3)


def choose_optimizers(wanted=None) -> tuple[list[str], list[str]]:
    """The optimizers to run (AdamL's cpu and reference backends, torch fused Adam), notes."""
    available = backends.available_backends(torch.device("cpu"))
    chosen, notes = [], []
    for name in OPTIMIZERS:
        if wanted is not None and name not in wanted:
            continue
        if name != "torch_fused" and name.partition("+")[0] not in available:
            reason = backends.unavailable_reason(name.partition("+")[0], "cpu")
            notes.append(f"{name}: unavailable ({reason})")
            continue
        chosen.append(name)
    return chosen, notes


def auto_jobs(layers: int, width: int) -> int:
    """Worker processes at a time: 2 (on 2+ cores) where two footprints (about 8x the parameter
    bytes, plus 1.5 GB for torch) fit in a quarter of the free memory, else 1. Processes running
    side by side change no one's RSS, only the time taken."""
    footprint = 8 * 4 * layers * (width * width + width) + (3 << 29)
    return 2 if (os.cpu_count() or 1) >= 2 and 2 * footprint < free_memory_bytes(
        torch.device("cpu")) // 4 else 1


def run_memory_cpu(size: str = DEFAULT_SIZE, wanted=None, threads: int | None = None,
                   timeout: float = 900.0, jobs: int | None = None,
                   log=print) -> tuple[list[dict], dict]:
    """Every scenario with every optimizer, each in a fresh process: the rows and run facts."""
    layers, width = parse_mem_size(size)
    optimizers, notes = choose_optimizers(wanted)
    if wanted is not None:
        notes += [f"{w}: not part of the CPU memory benchmark" for w in wanted
                  if w not in OPTIMIZERS]
    jobs = jobs or auto_jobs(layers, width)
    pairs = [(s, o) for s in SCENARIOS for o in optimizers]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(
            lambda so: _run_worker(so[0], so[1], layers, width, threads, timeout), pairs))
    rows = []
    for (scenario, opt), r in zip(pairs, results):
        if "error" in r:
            log(f"note: memory-cpu {scenario} / {opt}: {r['error']}")
        rows += _rows_of(scenario, opt, r)
    order = {n: i for i, n in enumerate(ROWS)}
    rows.sort(key=lambda r: (order[r["scenario"]], optimizers.index(r["optimizer"])))
    ok = [r for r in results if "error" not in r]
    param_bytes = ok[0]["param_bytes"] if ok else 4 * layers * (width * width + width)
    _add_ratios(rows, param_bytes)
    info = {"env": environment(torch.device("cpu")), "layers": layers, "width": width,
            "batch": BATCH, "n_params": layers * (width * width + width),
            "param_bytes": param_bytes,
            "baselines": [r["baseline"] for r in ok], "notes": notes, "jobs": jobs,
            "threads": threads or torch.get_num_threads(),
            "hwm_reset": all(r.get("hwm_reset", False) for r in ok),
            "elapsed_s": time.perf_counter() - t0}
    return rows, info


def memory_cpu_header_lines(info: dict) -> list[str]:
    env, pmb = info["env"], info["param_bytes"] / MB
    base = info["baselines"]
    base_text = (f"{min(base) / MB:.0f}-{max(base) / MB:.0f} MB across the processes"
                 if base else "none measured")
    return [
        f"adaml-bench CPU memory on {env['device_name']} ({info['threads']} threads a "
        f"process), torch {env['torch_version']}, Python {env['python_version']}; "
        f"{info['jobs']} worker process{'es' if info['jobs'] > 1 else ''} at a time",
        f"model: {info['layers']} x nn.Linear({info['width']}, {info['width']}), "
        f"{info['n_params']:,} float32 parameters ({pmb:.1f} MB; their gradients as much), "
        f"batch {info['batch']}, MSE loss; one fresh process per scenario and optimizer.",
        "baseline: VmRSS after building the model and its first forward+backward (a .grad on "
        "every parameter) and gc.collect(), before the optimizer is made; it holds the "
        f"interpreter, torch, the parameters and the gradients ({base_text}).",
        "A step: forward, backward, opt.step, zero_grad(set_to_none=True). Peaks: VmHWM, reset "
        "to the current RSS (/proc/self/clear_refs) just before the part measured"
        + ("." if info["hwm_reset"] else "; the reset FAILED here, so peaks are since the "
           "process started."),
        "steady_peak: peak of steps 2-4; steady_resident: RSS after step 4's zero_grad; "
        "late_param: peak of step 5, where a 10-element parameter (in the group from the start) "
        "gets its first gradient, minus steady_peak; state_dict: peak while opt.state_dict() "
        "runs after step 4; zero_grad: RSS after step 4's zero_grad (own process). "
        "MB = 2^20 bytes; x fused = MB / torch fused Adam's MB, shown where torch's is >= 1 MB "
        "and >= 1% of the parameters' MB.",
    ]


def format_memory_cpu_table(rows: list[dict]) -> str:
    w = max([11] + [len(r["optimizer"]) for r in rows])
    head = f"{'scenario':<16} {'optimizer':<{w}} {'MB':>9} {'relative to':<12} {'x fused':>8}" \
           "  detail"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["skipped"]:
            lines.append(f"{r['scenario']:<16} {r['optimizer']:<{w}}  skipped: {r['skipped']}")
            continue
        ratio = "-" if r["vs_torch_fused"] is None else f"{r['vs_torch_fused']:.2f}"
        lines.append(f"{r['scenario']:<16} {r['optimizer']:<{w}} {r['value_mb']:>9.1f} "
                     f"{r['relative_to']:<12} {ratio:>8}  {r['detail']}".rstrip())
    return "\n".join(lines)
