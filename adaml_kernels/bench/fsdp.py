"""The FSDP2 case: AdamL and torch's Adam stepping the same sharded model on several ranks.

A stack of `layers` Linear(width, width) layers is sharded with FSDP2's fully_shard (each layer,
then the root) over the ranks: 2 gloo ranks on the CPU, the CPU threads split between them;
nccl with one GPU per rank on CUDA, as many ranks as GPUs up to 2 (one GPU: a 1-rank mesh, where
FSDP2 shards nothing but every parameter is still a DTensor). The ranks are started here, with
spawn and a file:// store.

Before every step each rank runs a forward and backward pass, untimed: FSDP2's reduce-scatter
hands the optimizer new gradient DTensors, as in a real loop. Only opt.step is timed: all ranks
start it together after a barrier (and, on CUDA, a synchronisation), and a step's time is the
slowest rank's. AdamL's step includes the all-reduce of the loss over the ranks (it averages the
loss over the data-parallel group); torch's Adam has no such collective. The optimizers take
turns on the same model, each turn led by untimed steps; every optimizer keeps its own state.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch

from .cases import Case
from ..optimizer import AdamL
from .contenders import LR, Contender, unsupported_reason
from .environment import environment
from .errors import reason
from .rows import base_row
from .timing import stats

FSDP_KEYS = ("ranks", "dist_backend", "layers", "width", "local_params", "threads_per_rank",
             "grads")
LOCAL_LOSS = ":no-loss-avg"  # an AdamL row without the loss all-reduce (loss_group=None)
LEAD, BLOCK = 2, 5  # per turn: untimed steps, then timed ones


@dataclass
class FsdpConfig:
    device: str
    ranks: int
    width: int
    layers: int
    batch: int
    reps: int  # timed steps per optimizer
    dtypes: list[str]
    wanted: list[str] | None
    threads: int  # per rank (CPU)

    @property
    def n_params(self) -> int:
        return self.layers * (self.width * self.width + self.width)


def fsdp_config(device: torch.device, dtypes, wanted=None, ranks=None, quick=False, smoke=False,
                threads=None) -> tuple[FsdpConfig, list[str]]:
    """Ranks, model and repetitions for `device`; notes on what was chosen and why."""
    notes = []
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        world = min(ranks or 2, gpus)
        if world < (ranks or 2):
            notes.append(f"{gpus} GPU(s): {world} rank(s), one GPU each"
                         + (" (a 1-rank mesh: FSDP2 shards nothing, the parameters are still "
                            "DTensors)" if world == 1 else ""))
    else:
        world = ranks or 2
    threads = threads or max(1, (os.cpu_count() or 1) // world)
    if smoke:
        width, layers, reps = 64, 2, 5
    else:  # 4 x Linear(1024, 1024): 4.2M parameters (8 x on a GPU: 8.4M)
        width, layers = 1024, 8 if device.type == "cuda" else 4
        reps = 20 if quick else 60
    cfg = FsdpConfig(device.type, world, width, layers, 16, reps,
                     [str(dt).replace("torch.", "") for dt in dtypes], wanted, threads)
    return cfg, notes


def run_fsdp(device: torch.device, dtypes, wanted=None, ranks=None, quick=False, smoke=False,
             threads=None, log=print) -> tuple[list[dict], dict]:
    """Start the ranks, time every optimizer on the sharded model; returns (rows, info)."""
    import torch.multiprocessing as mp

    from .host_overhead import host_contenders

    cfg, notes = fsdp_config(device, dtypes, wanted, ranks, quick, smoke, threads)
    contenders, more = host_contenders(device, wanted)
    notes += more
    env = environment(device)
    env["threads"] = cfg.threads
    info = {"env": env, "notes": notes, "config": asdict(cfg),
            "contenders": [c.name for c in contenders]}
    with tempfile.TemporaryDirectory(prefix="adaml-fsdp-") as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "rows.json")
        t0 = time.perf_counter()
        try:
            mp.start_processes(_rank_main, args=(cfg, store, out), nprocs=cfg.ranks,
                               start_method="spawn")
            rows = json.load(open(out))
        except Exception as e:  # failed ranks: rows that say why, not a crash
            log(f"error: the FSDP2 case failed: {reason(e)}")
            rows = []
            for dt in cfg.dtypes:
                for c in contenders:
                    row = base_row(_case(cfg), getattr(torch, dt), c, env)
                    row["skipped"] = f"the FSDP2 case failed: {reason(e)}"
                    rows.append(row)
        info["wall_s"] = round(time.perf_counter() - t0, 1)
    return rows, info


def with_local_loss(contenders: list[Contender]) -> list[Contender]:
    """After each AdamL contender, the same backend with loss_group=None: no loss all-reduce.

    Each rank then uses its own loss, which a data-parallel run must not do; the row is there to
    show how much of AdamL's step is the all-reduce.
    """
    out = []
    for c in contenders:
        out.append(c)
        if c.family == "adaml" and c.mode.name == "default":
            out.append(Contender(
                f"{c.name}{LOCAL_LOSS}", "adaml",
                lambda ps, b=c.backend: AdamL(ps, lr=LR, backend=b, loss_group=None), c.step,
                backend=c.backend))
    return out


def _case(cfg: FsdpConfig) -> Case:
    return Case("fsdp", f"fsdp_{cfg.layers}x{cfg.width}",
                [(cfg.width, cfg.width), (cfg.width,)] * cfg.layers)


def _rank_main(rank: int, cfg: FsdpConfig, store: str, out: str) -> None:
    import torch.distributed as dist

    device = torch.device(cfg.device, rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cfg.threads)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{store}", rank=rank, world_size=cfg.ranks,
                            timeout=timedelta(seconds=120))
    try:
        rows = [row for dt in cfg.dtypes for row in _time_dtype(cfg, device, getattr(torch, dt))]
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def _time_dtype(cfg: FsdpConfig, device: torch.device, dtype: torch.dtype) -> list[dict]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .host_overhead import host_contenders
    from .timing import Timer

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(cfg.width, cfg.width)
                                  for _ in range(cfg.layers)]).to(device, dtype)
    mesh = init_device_mesh(device.type, (cfg.ranks,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    local = sum(p.to_local().numel() for p in params)
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    x = torch.randn(cfg.batch, cfg.width, generator=gen)
    x = x.to(device, dtype)
    contenders = with_local_loss(host_contenders(device, cfg.wanted)[0])
    case, env, timer = _case(cfg), environment(device), Timer(device)
    env["threads"] = cfg.threads if device.type == "cpu" else env["threads"]

    def fresh_grads():  # a real loop's backward: new gradient DTensors (reduce-scattered)
        model.zero_grad(set_to_none=True)
        loss = model(x).float().square().mean()
        loss.backward()
        return loss.detach()

    rows, opts, times = {}, {}, {}
    for c in contenders:
        rows[c.name] = base_row(case, dtype, c, env)
        why = unsupported_reason(c, dtype)
        if why is not None:
            rows[c.name]["skipped"] = why
            continue
        try:
            opts[c.name] = c.make(params)
            times[c.name] = []
        except Exception as e:  # e.g. a dtype a backend does not take: the same on every rank
            rows[c.name]["skipped"] = reason(e)
    active, turn = [c for c in contenders if c.name in opts], 0
    while active:
        shift, turn = turn % len(active), turn + 1
        for c in active[shift:] + active[:shift]:
            opt = opts[c.name]
            for _ in range(LEAD):
                c.step(opt, fresh_grads())
            for _ in range(min(BLOCK, cfg.reps - len(times[c.name]))):
                loss = fresh_grads()
                timer.sync()
                dist.barrier()
                t, _ = timer.time(lambda: c.step(opt, loss))
                times[c.name].append(t)
        active = [c for c in active if len(times[c.name]) < cfg.reps]
    # A step takes as long as its slowest rank.
    everyone = [None] * cfg.ranks
    dist.all_gather_object(everyone, times)
    fused_ms = None
    out = []
    for c in contenders:
        row = rows[c.name]
        if c.name in opts:
            slowest = [max(ts) for ts in zip(*(t[c.name] for t in everyone))]
            row.update(stats(slowest))
            row["sets"] = 1
            row["bytes_moved"] = row["bytes_per_param"] * local
            row["gbps"] = row["bytes_moved"] / (row["median_ms"] / 1e3) / 1e9
        row.update(ranks=cfg.ranks, dist_backend=dist.get_backend(), layers=cfg.layers,
                   width=cfg.width, local_params=local, threads_per_rank=cfg.threads,
                   grads="new every step (forward + backward)", timer=timer.method)
        if c.name == "torch_fused":
            fused_ms = row["median_ms"]
        out.append(row)
    for row in out:
        if fused_ms and row["median_ms"] is not None:
            row["vs_torch_fused"] = row["median_ms"] / fused_ms
            row["speedup_vs_torch_fused"] = fused_ms / row["median_ms"]
    opts.clear()
    return out


def fsdp_header_lines(info: dict) -> list[str]:
    env, cfg = info["env"], info["config"]
    dev = (f"{cfg['ranks']} gloo ranks on the CPU ({env['device_name']}), {cfg['threads']} "
           "thread(s) each" if cfg["device"] == "cpu" else
           f"{cfg['ranks']} nccl rank(s), one {env['device_name']} each")
    n = cfg["layers"] * (cfg["width"] ** 2 + cfg["width"])
    return [
        f"adaml-bench FSDP2: {dev}; torch {env['torch_version']}",
        f"Model: {cfg['layers']} x Linear({cfg['width']}, {cfg['width']}), {n / 1e6:.2f}M "
        f"parameters, fully_shard per layer and at the root; about {n / cfg['ranks'] / 1e6:.2f}M "
        "per rank.",
        "Timed: opt.step only, after a barrier; ms per step = the slowest rank's, median and "
        "p10-p90 over the timed steps. Every step gets new gradients from an untimed forward "
        "and backward. AdamL's step includes its loss all-reduce over the ranks. x fused = "
        "time / torch fused Adam's (< 1: faster).",
        f"{LOCAL_LOSS[1:]}: the same AdamL backend with loss_group=None (each rank its own "
        "loss, not a valid data-parallel run): the difference is the loss all-reduce's cost.",
    ]


def format_fsdp_table(rows: list[dict]) -> str:
    lines = [f"{'dtype':<9} {'optimizer':<18} {'median ms':>10} {'p10-p90 ms':>17} "
             f"{'x fused':>8} {'local params':>13}"]
    for r in rows:
        if r["median_ms"] is None:
            lines.append(f"{r['dtype']:<9} {r['backend']:<18} skipped: {r['skipped']}")
            continue
        spread = f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}"
        ratio = "-" if r["vs_torch_fused"] is None else f"{r['vs_torch_fused']:.2f}"
        lines.append(f"{r['dtype']:<9} {r['backend']:<18} {r['median_ms']:>10.3f} {spread:>17} "
                     f"{ratio:>8} {r['local_params']:>13,}")
    return "\n".join(lines)


def fsdp_ratio_lines(rows: list[dict]) -> list[str]:
    """AdamL / torch fused per fused AdamL backend and dtype: the number this case is for."""
    out = []
    for r in rows:
        if r["optimizer"] == "AdamL" and r["vs_torch_fused"] is not None and math.isfinite(
                r["vs_torch_fused"]):
            out.append(f"AdamL {r['backend']} / torch fused Adam ({r['dtype']}): "
                       f"{r['vs_torch_fused']:.2f} ({r['median_ms']:.3f} vs "
                       f"{r['median_ms'] / r['vs_torch_fused']:.3f} ms/step)")
    return out
