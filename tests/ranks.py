"""Running a function on several ranks (gloo or NCCL, a file:// store, a timeout on every
collective)."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A rank that skipped a collective would leave the others waiting: time out, never hang.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def _entry(rank, world, store, backend, fn, args):
    torch.set_num_threads(1)  # two ranks on two cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    fn(rank, world, *args)
    dist.barrier()  # every rank done with its collectives before any tears down
    dist.destroy_process_group()
    # The work is done and written. Skip the interpreter's teardown: with many sub-groups
    # (device meshes made again and again) gloo's threads sometimes outlive it, and the C++
    # runtime then aborts a rank that had succeeded ("terminate called without an active
    # exception"), seen about once in three runs of the GPT example's test.
    os._exit(0)


def run_ranks(fn, world: int, *args, backend: str = "gloo") -> None:
    """fn(rank, world, *args) on `world` processes (one GPU each under "nccl"); raises if any
    of them fails."""
    store = tempfile.mktemp(prefix="adaml-store-")
    # spawn, not fork: a forked child cannot run autograd once the parent has (nor CUDA).
    try:
        mp.start_processes(_entry, args=(world, store, backend, fn, args), nprocs=world,
                           start_method="spawn")
    finally:
        if os.path.exists(store):
            os.remove(store)


class OneRank:
    """A process group of one rank in this process (DTensor and DCP code paths, no children)."""

    def __enter__(self):
        self.store = tempfile.mktemp(prefix="adaml-store-")
        dist.init_process_group("gloo", init_method=f"file://{self.store}", rank=0,
                                world_size=1, timeout=COLLECTIVE_TIMEOUT)
        return self

    def __exit__(self, *exc):
        dist.destroy_process_group()
        if os.path.exists(self.store):
            os.remove(self.store)
