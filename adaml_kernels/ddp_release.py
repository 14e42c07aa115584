"""Gradient release under DistributedDataParallel: AdamL's communication hook.

DDP all-reduces its buckets after autograd has called the parameters' post-accumulate-grad
hooks, so those hooks see unreduced gradients. Under DDP a release bucket therefore steps
from DDP's communication hook instead (docs/gradient_release.md, DDP): the hook all-reduces
each DDP bucket as DDP's default one does (times 1 / world size, then summed) and, once DDP
hands in the next bucket (or backward ends), waits on it (under NCCL a stream dependency, the
host goes on; under gloo the host waits) and hands the reduced gradients to the optimizer.
DDP's reducer is told that an optimizer ran in backward (the mode torch.distributed.optim's
_apply_optimizer_in_backward uses), so that at the end of backward it does not write the
reduced gradients back into .grad.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def ddp_params(ddp_model) -> list[torch.Tensor]:
    """The parameters DDP reduces (those that required a gradient when it was built, less the
    ignored ones), after checking that their gradients can reach AdamL as they are reduced
    (raises before anything changes)."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError("register_ddp() takes the DistributedDataParallel model (the wrapper), "
                        f"got {type(ddp_model).__name__}")
    refusals = [
        (ddp_model.find_unused_parameters, "find_unused_parameters=True: which parameters got "
         "no gradient on any rank is known only at the end of backward, after their buckets "
         "would have stepped"),
        (ddp_model.static_graph, "static_graph=True: its first backward all-reduces the "
         "buckets at the end of backward, and later ones leave unused parameters out"),
        (getattr(ddp_model, "mixed_precision", None) is not None,
         "mixed_precision: DDP casts the reduced gradients after the communication hook"),
        (bool(getattr(ddp_model, "_comm_hooks", ())),
         "another communication hook: AdamL's must be the only one"),
        (not hasattr(getattr(ddp_model, "reducer", None), "_set_optimizer_in_backward"),
         "this torch version: its reducer has no optimizer-in-backward mode"),
    ]
    for refused, why in refusals:
        if refused:
            raise ValueError(f"gradient release cannot be combined with DDP's {why}")
    ignored = ddp_model.parameters_to_ignore
    return [p for name, p in ddp_model.module.named_parameters()
            if p.requires_grad and name not in ignored]


def register(ddp_model, reduced: Callable[[list, list], bool]) -> None:
    """Make `ddp_model` all-reduce each bucket with AdamL's hook and call reduced(params,
    grads) with the reduced gradients; where it returns False (the optimizer is gone), the
    gradients are written into .grad, as DDP's end of backward would.

    A bucket is handed over when DDP hands in the next one (its all-reduce ran while autograd
    computed that one's gradients), the last at the end of backward (a callback queued at the
    backward's first bucket, so it runs before the optimizer's own end of backward)."""
    import torch.distributed as dist

    group = ddp_model.process_group
    world = dist.get_world_size(group)
    in_flight: list[tuple] = []  # (the all-reduce's work, its bucket), oldest first
    backward = [None]  # the graph task (backward pass) they belong to

    def hand_over(work, bucket) -> None:
        work.wait()  # under NCCL a stream dependency; under gloo the host waits
        params, grads = bucket.parameters(), bucket.gradients()
        if not reduced(params, grads):
            for p, g in zip(params, grads):
                write_back(p, g)

    def hand_over_the_rest() -> None:
        while in_flight:
            hand_over(*in_flight.pop(0))

    def adaml_release_hook(state, bucket):
        task = torch._C._current_graph_task_id()
        if task != backward[0]:  # this backward's first bucket
            backward[0] = task
            for work, _ in in_flight:  # (left by a backward that failed midway)
                work.wait()
            in_flight.clear()
            torch.autograd.Variable._execution_engine.queue_callback(hand_over_the_rest)
        buffer = bucket.buffer()
        # As DDP's default reduction, bit for bit: each rank's gradient times 1 / world (a
        # float32 multiplier: dividing instead differs in the last bit), then summed.
        buffer.mul_(1.0 / world)
        in_flight.append((dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group,
                                          async_op=True), bucket))
        while len(in_flight) > 1:
            hand_over(*in_flight.pop(0))
        done = torch.futures.Future()  # (DDP reads nothing from it: optimizer in backward)
        done.set_result(buffer)
        return done

    ddp_model.register_comm_hook(None, adaml_release_hook)
    ddp_model.reducer._set_optimizer_in_backward()


def write_back(p: torch.Tensor, g: torch.Tensor) -> None:
    """DDP's end of backward for one parameter: .grad holds its reduced gradient."""
    if p.grad is None:
        p.grad = g.clone()
    elif p.grad.data_ptr() != g.data_ptr():  # (gradient_as_bucket_view: it is that view)
        p.grad.copy_(g)
