"""Train a small byte-level GPT on Python's bundled help texts with AdamL.

Three ways to run it (gloo on the CPU, nccl with one GPU per rank):

    python examples/train_gpt.py                                    # one process
    torchrun --nproc_per_node 2 examples/train_gpt.py --fsdp        # FSDP2, data parallel
    torchrun --nproc_per_node 2 examples/train_gpt.py --tp          # tensor parallel (dp x tp)

`--tp N` sets the tensor-parallel degree (default: every rank), the rest is data parallel over
FSDP2: 4 ranks with `--tp 2` are a (2, 2) mesh. `--batch-size` is the global batch; each
data-parallel rank trains on its slice. The batch of step k is a function of (seed, k) only, so
`--resume` continues bitwise where the checkpoint left off. `--ckpt DIR` writes a
torch.distributed.checkpoint (model + optimizer) to DIR/step-K at the end (and every
`--save-every` steps); `--resume` loads the latest one and trains on up to `--steps`.

`--gradient-release` builds AdamL with gradient_release=True (docs/gradient_release.md, bucket size
`--bucket-cap-mb`): the step registers its loss with opt.add_loss(loss) before backward, each
bucket of parameters is updated during backward as soon as its gradients are complete and those
gradients are freed, and opt.step() finishes the step. It runs in one process and under FSDP2
(`torchrun --nproc_per_node 2 examples/train_gpt.py --fsdp --gradient-release`). Gradient
clipping by global norm cannot be combined with it (the norm needs every gradient, and the
buckets step before the last one exists): under --gradient-release the default --clip is 0 (no
clipping), and an explicit --clip > 0 is refused. Elsewhere --clip defaults to 1.0; --clip 0
turns clipping off. bf16 autocast needs no GradScaler and works with both.

`--telemetry` builds AdamL with telemetry=True (docs/telemetry.md) and prints, on logging steps
only, the share of SGD-like elements, the RMS of the update and the shares of lost bf16 updates
and of saturated w, over the whole model (under FSDP2 and tensor parallelism the ranks' figures
are combined with adaml_kernels.telemetry.all_reduce, one all-reduce on those steps); `--out`
records them per logged step. It cannot be combined with --gradient-release yet.

Per step it measures the whole step (batch, forward, backward, clipping, optimizer) and the time
in opt.step alone (AdamL's loss all-reduce included), synchronising on CUDA. Under
--gradient-release the optimizer's updates run inside backward, so they count in the step time
but not in opt.step's (which only launches what is still pending and counts the skip): the
optimizer share printed is then that of opt.step alone. It prints loss,
tokens/s (global tokens over step time) and the optimizer's share of step time, first steps
(warm-up, compilation) excluded. The progress bar needs tqdm (`pip install tqdm`, or the
`.[bench]` extra); `--no-bar` prints plain lines instead. `--out FILE` writes a JSON summary:
per-step losses, the timings and a SHA-256 of the full parameters (rank 0 writes it).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt_model import GPT, apply_fsdp, apply_tp, batch, load_bytes  # noqa: E402

from adaml_kernels import AdamL  # noqa: E402

WARMUP = 2  # steps left out of tokens/s and the optimizer share (compilation, first allocations)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="train up to this step count")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (sequences)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=None, help="default: d_model / 16")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=None,
                   help="max gradient norm, 0: no clipping (default: 1.0; 0 under "
                        "--gradient-release, which cannot clip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--ckpt", metavar="DIR", help="write DCP checkpoints to DIR/step-K")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps")
    p.add_argument("--resume", action="store_true", help="start from the latest DIR/step-K")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 over all ranks (under torchrun)")
    p.add_argument("--tp", type=int, nargs="?", const=-1, default=None, metavar="N",
                   help="tensor parallel of degree N (default: all ranks), FSDP2 over the rest")
    p.add_argument("--gradient-release", action="store_true",
                   help="update each bucket during backward and free its gradients")
    p.add_argument("--bucket-cap-mb", type=float, default=None,
                   help="gradient release: the most gradient MiB of one bucket (AdamL's default)")
    p.add_argument("--telemetry", action="store_true",
                   help="log AdamL's telemetry (SGD-like share, update RMS) on logging steps")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the model")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast")
    p.add_argument("--no-bar", action="store_true", help="plain lines, no tqdm bar")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", metavar="FILE", help="write a JSON summary (rank 0)")
    args = p.parse_args(argv)
    if args.clip is not None and args.clip < 0:
        p.error(f"--clip {args.clip}: must be >= 0 (0: no clipping)")
    if args.gradient_release and args.clip:
        p.error(f"--clip {args.clip} cannot be combined with --gradient-release: clipping by "
                "global norm needs every gradient, and the buckets step during backward, before "
                "the last one exists (leave --clip out, or --clip 0)")
    if args.telemetry and args.gradient_release:
        p.error("--telemetry cannot be combined with --gradient-release yet (AdamL refuses it)")
    if args.bucket_cap_mb is not None and not args.gradient_release:
        p.error("--bucket-cap-mb sizes gradient release's buckets: it needs --gradient-release")
    if args.clip is None:
        args.clip = 0.0 if args.gradient_release else 1.0
    if args.resume and not args.ckpt:
        p.error("--resume needs --ckpt DIR")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (args.fsdp or args.tp):
        p.error("several ranks: choose --fsdp or --tp")
    return args


def setup(args):
    """Device, mesh and this rank's data-parallel coordinates; starts the process group."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (args.fsdp or args.tp):
        return device, None, None, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    tp = world if args.tp == -1 else (args.tp or 1)
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide {world} ranks")
    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    dp_mesh = mesh["dp"]
    return device, mesh, dp_mesh, dp_mesh.get_local_rank(), dp_mesh.size()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also across DTensors on different meshes.

    Under FSDP2 alone every parameter lives on one mesh and clip_grad_norm_ does it all. Under
    dp x tp the TP-sharded parameters live on the 2-D mesh and the others on the dp mesh, and
    clip_grad_norm_ cannot stack norms from two meshes: take each mesh's total norm whole
    (full_tensor reduces it over that mesh), combine them, and scale every gradient by it.
    """
    by_mesh = defaultdict(list)
    for p in params:
        if p.grad is not None:
            by_mesh[getattr(p, "device_mesh", None)].append(p)
    if len(by_mesh) <= 1:
        return torch.nn.utils.clip_grad_norm_([p for ps in by_mesh.values() for p in ps], max_norm)
    norms = []
    for ps in by_mesh.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in ps])
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    total = torch.linalg.vector_norm(torch.stack(norms))
    for ps in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total)
    return total


def save(model, opt, step: int, args) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": torch.tensor(step)}
    dcp.save(state, checkpoint_id=os.path.join(args.ckpt, f"step-{step:07d}"),
             no_dist=not dist.is_initialized())


def load(model, opt, args) -> int:
    """Load the latest checkpoint in args.ckpt into model and opt; returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    found = sorted(glob.glob(os.path.join(args.ckpt, "step-*", ".metadata")))
    if not found:
        raise SystemExit(f"--resume: no checkpoint in {args.ckpt}")
    # A fresh AdamL has no state yet: get_state_dict makes it (a step with lr 0, nothing moves).
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=os.path.dirname(found[-1]), no_dist=not dist.is_initialized())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


def model_figures(opt, mesh) -> dict:
    """AdamL's telemetry of the last step over the whole model, as floats: the param group's
    figures (this script has one group), combined over the ranks that hold different shards."""
    import adaml_kernels.telemetry

    groups = opt.telemetry()
    if mesh is not None:
        groups = adaml_kernels.telemetry.all_reduce(groups)
    return {key: float(value) for key, value in groups[0].items()}


def params_sha256(model) -> str:
    """SHA-256 of every full parameter in order (a collective under DTensor: all ranks call)."""
    h = hashlib.sha256()
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> dict:
    args = parse_args(argv)
    owns_group = bool(args.fsdp or args.tp) and not dist.is_initialized()
    device, mesh, dp_mesh, dp_rank, dp_size = setup(args)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if args.batch_size % dp_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of {dp_size} dp ranks")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(args.d_model, args.layers, args.seq_len, args.heads).to(device)
    if mesh is not None and mesh["tp"].size() > 1:
        apply_tp(model, mesh["tp"])
    if mesh is not None:
        apply_fsdp(model, dp_mesh)
    # The loss AdamL uses is averaged over the data-parallel ranks only: the ranks of one TP
    # group see the same batch and compute the same loss, so averaging over the world would
    # just weight each data-parallel batch tp times. Without a process group: nothing to average.
    release = dict(gradient_release=True, bucket_cap_mb=args.bucket_cap_mb) \
        if args.gradient_release else {}
    opt = AdamL(model.parameters(), lr=args.lr, loss_group=dp_mesh, telemetry=args.telemetry,
                **release)
    start = load(model, opt, args) if args.resume else 0
    fwd = model if args.no_compile else torch.compile(model)
    data = load_bytes()
    n_params = sum(p.numel() for p in model.parameters())
    tokens = args.batch_size * args.seq_len  # global, per step
    if rank0:
        print(f"GPT {n_params / 1e6:.2f}M params, {args.layers} layers, d_model {args.d_model}; "
              f"device {device}, "
              f"mesh {None if mesh is None else dict(zip(mesh.mesh_dim_names, mesh.shape))}, "
              f"compile {not args.no_compile}, bf16 autocast {not args.no_amp}, "
              f"gradient release {args.gradient_release}, clip {args.clip}; "
              f"steps {start}->{args.steps}")

    bar = None
    if rank0 and not args.no_bar:
        try:
            from tqdm import tqdm
        except ImportError:
            raise SystemExit("the progress bar needs tqdm: pip install tqdm, or run with --no-bar")
        bar = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True)
    say = bar.write if bar is not None else print
    losses, step_s, opt_s, figures = {}, [], [], {}
    for step in range(start, args.steps):
        sync()
        t0 = time.perf_counter()
        x, y = (t.to(device, non_blocking=True) for t in batch(
            data, step, args.seed, args.batch_size, args.seq_len, dp_rank, dp_size))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_amp):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if args.gradient_release:
            opt.add_loss(loss)  # before backward: the buckets step during it
        loss.backward()
        if args.clip:
            clip_grad_norm(model.parameters(), args.clip)
        sync()
        t1 = time.perf_counter()
        if args.gradient_release:
            opt.step()  # the buckets still pending, the skip count
        else:
            opt.step(loss)
        sync()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        step_s.append(t3 - t0)
        opt_s.append(t2 - t1)
        shown = loss.detach().double()  # for the log: the mean over data-parallel ranks
        if dp_mesh is not None and dp_size > 1:
            dist.all_reduce(shown, group=dp_mesh.get_group())
            shown /= dp_size
        losses[step + 1] = shown.item()
        if args.ckpt and args.save_every and (step + 1) % args.save_every == 0 \
                and step + 1 < args.steps:
            save(model, opt, step + 1, args)
        logging = (step + 1) % args.log_every == 0 or step + 1 == args.steps
        if args.telemetry and logging:  # every rank: under FSDP2 / TP it is an all-reduce
            figures[step + 1] = model_figures(opt, mesh)
        if rank0:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[step + 1]:.4f}",
                                tok_s=f"{tokens / step_s[-1]:.0f}")
            if logging:
                say(f"step {step + 1:5d}  loss {losses[step + 1]:.4f}  "
                    f"{tokens / step_s[-1]:8.0f} tok/s  opt {100 * opt_s[-1] / step_s[-1]:4.1f}%"
                    + ("" if not args.telemetry else
                       "  sgd-like {sgd_like_fraction:.3f}  update rms {update_rms:.2e}  "
                       "lost {lost_update_fraction:.3f}  saturated {saturated_fraction:.3f}"
                       .format(**figures[step + 1])))
    if bar is not None:
        bar.close()
    if args.ckpt and step_s:
        save(model, opt, args.steps, args)

    timed = slice(WARMUP, None) if len(step_s) > WARMUP else slice(None)
    steady, steady_opt = sum(step_s[timed]), sum(opt_s[timed])
    summary = {
        "steps": [start, args.steps], "losses": losses,
        "first_loss": losses[min(losses)] if losses else None,
        "last_loss": losses[max(losses)] if losses else None,
        "tokens_per_s": len(step_s[timed]) * tokens / steady if steady else None,
        "step_ms": 1e3 * steady / max(len(step_s[timed]), 1),
        "opt_share": steady_opt / steady if steady else None,
        "first_step_s": step_s[0] if step_s else None,
        "params": n_params, "params_sha256": params_sha256(model), "device": str(device),
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "mesh": None if mesh is None else dict(zip(mesh.mesh_dim_names, mesh.shape)),
        "compiled": not args.no_compile, "amp_bf16": not args.no_amp,
        "gradient_release": args.gradient_release, "bucket_cap_mb": opt.bucket_cap_mb,
        "clip": args.clip, "telemetry": figures if args.telemetry else None,
    }
    if rank0 and not step_s:
        print(f"nothing to train: the checkpoint is at step {start}, --steps is {args.steps}")
    elif rank0:
        print(f"done: loss {summary['first_loss']} -> {summary['last_loss']}; "
              f"{summary['tokens_per_s'] or 0:.0f} tokens/s, {summary['step_ms']:.1f} ms/step, "
              f"opt.step {100 * (summary['opt_share'] or 0):.1f}% of step time"
              f"{' (the updates run inside backward)' if args.gradient_release else ''} "
              f"(steps after the first {WARMUP}); first step {summary['first_step_s']:.2f} s")
    if rank0 and args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    if owns_group:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
