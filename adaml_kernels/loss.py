"""Everything about the loss: taking it, checking it, averaging it over the data-parallel group,
f_1, and the decision whether a step is taken.

The loss is never read on the host. Whether a step is taken is a 0-dim float32 tensor on the
device (1.0 taken, 0.0 skipped) that the kernels read, so a step needs no host synchronisation.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

# The floating dtypes the kernels read a loss in (an integer loss is converted to float32).
LOSS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

NEEDS_LOSS = (
    "AdamL needs the current loss: call step(loss) with the loss whose gradients are in .grad "
    "(a 0-dim tensor or a number), step(closure) with a closure that recomputes and returns "
    "it, or register it with add_loss(loss) after each backward()"
)


def is_real_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_loss(loss) -> None:
    """Raise unless `loss` is a one-element real tensor holding a value the kernels can read, or
    a real number."""
    if loss is None:
        raise TypeError(NEEDS_LOSS)
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"loss must have exactly one element, got shape {tuple(loss.shape)}; "
                "reduce it (e.g. loss.mean()) before the step"
            )
        if loss.is_complex() or loss.dtype == torch.bool:
            raise ValueError(f"loss must be a real number, got dtype {loss.dtype}")
        if loss.is_floating_point() and loss.dtype not in LOSS_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in LOSS_DTYPES)
            raise ValueError(
                f"loss dtype {loss.dtype} is not supported; use one of {names} (e.g. loss.float())"
            )
        if loss.device.type == "meta":
            raise ValueError("loss is on the meta device: it has no value to step with")
    elif not is_real_number(loss):
        raise TypeError(f"loss must be a 0-dim tensor or a real number, got {type(loss).__name__}")


def is_nonfinite_number(loss) -> bool:
    """A Python number that is nan or inf: such a step is skipped without touching a device."""
    return not isinstance(loss, torch.Tensor) and not math.isfinite(loss)


def move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`, safe to use there at once.

    Into an accelerator the copy is non-blocking (the stream orders it before the kernels, and a
    copy from pageable host memory is staged before the call returns). Out of an accelerator
    into host memory it must block: the CPU kernels read the value as soon as the op is called,
    and a non-blocking copy may not have landed yet. That is one device synchronisation per
    step for a CPU bucket fed by a GPU loss (docs/large_models.md, mixed devices).
    """
    if t.device == device:
        return t
    return t.to(device, non_blocking=device.type != "cpu")


def as_tensor(loss, device: torch.device) -> torch.Tensor:
    """The loss as a 0-dim floating tensor on `device`, without a host-device synchronisation."""
    if isinstance(loss, torch.Tensor):
        loss_t = loss.detach().reshape(())
        if not loss_t.is_floating_point():
            loss_t = loss_t.to(torch.float32)
        return move(loss_t, device)
    # A number is filled in on the device: no host-to-device copy (which would block).
    return torch.full((), float(loss), dtype=torch.float64, device=device)


def process_group(loss_group):
    """The group whose losses are averaged, or None (no torch.distributed, one rank, or off)."""
    if loss_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if hasattr(loss_group, "get_group"):  # a 1-D DeviceMesh, e.g. mesh["dp"]
        loss_group = loss_group.get_group()
    group = dist.group.WORLD if loss_group == "world" else loss_group
    return group if dist.get_world_size(group) > 1 else None


def average(loss_t: torch.Tensor, group) -> torch.Tensor:
    """The mean of the ranks' losses (float64), the same on every rank of `group`."""
    return LossAverage(loss_t, group).result()


class LossAverage:
    """The mean of the ranks' losses, its all-reduce started at once (async) and waited on by
    result(): under NCCL that wait is a stream dependency (the host does not wait)."""

    def __init__(self, loss_t: torch.Tensor, group):
        import torch.distributed as dist

        self.total = loss_t.to(torch.float64, copy=True)
        self.world = dist.get_world_size(group)
        self.work = dist.all_reduce(self.total, op=dist.ReduceOp.SUM, group=group, async_op=True)

    def result(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.total / self.world


def decide_take(loss: torch.Tensor, found_inf: torch.Tensor | None) -> torch.Tensor:
    """1.0 if the step is taken, 0.0 if it is skipped (non-finite loss or found_inf)."""
    ok = torch.isfinite(loss)
    if found_inf is not None:
        ok = ok & (move(found_inf, loss.device) == 0)
    return ok.to(torch.float32)


def new_initial_loss(device: torch.device) -> torch.Tensor:
    """f_1 before any step: NaN, one float64 value for the whole optimizer."""
    return torch.full((), math.nan, dtype=torch.float64, device=device)


def record_initial_loss(initial_loss: torch.Tensor, loss: torch.Tensor, take: torch.Tensor):
    """f_1 = this loss, if no step was taken before and this one is (on the device)."""
    first = torch.isnan(initial_loss) & (take != 0)
    initial_loss.copy_(torch.where(first, loss.to(torch.float64), initial_loss))


def settle(loss_t: torch.Tensor, found_inf: torch.Tensor | None, grad_scale: torch.Tensor | None,
           initial_loss: torch.Tensor | None) -> "StepInputs":
    """What every launch of a step reads: the loss, whether the step is taken, the grad scale
    and f_1 (recorded here if this is the first step taken), all on the loss's device."""
    take = decide_take(loss_t, found_inf)
    if initial_loss is not None:
        record_initial_loss(initial_loss, loss_t, take)
    return StepInputs(loss_t, take, grad_scale, initial_loss)


@dataclass(frozen=True)
class StepInputs:
    """What every launch of one step reads, besides its bucket: all 0-dim, on one device."""

    loss: torch.Tensor
    take: torch.Tensor  # float32, 1.0 taken / 0.0 skipped
    grad_scale: torch.Tensor | None = None
    initial_loss: torch.Tensor | None = None  # f_1, float64

    def on(self, device: torch.device) -> "StepInputs":
        if self.loss.device == device and (
            self.grad_scale is None or self.grad_scale.device == device
        ):
            return self
        return StepInputs(*(None if t is None else move(t, device) for t in (
            self.loss, self.take, self.grad_scale, self.initial_loss)))


class PendingLoss:
    """Losses registered with add_loss() since the last step, summed on the device.

    .grad holds the sum of the gradients of every backward since zero_grad(), so the loss that
    belongs to it is the sum of those losses (gradient accumulation).
    """

    def __init__(self):
        self.total: torch.Tensor | None = None

    def add(self, loss) -> None:
        check_loss(loss)
        if isinstance(loss, torch.Tensor):
            value = loss.detach().reshape(()).to(torch.float64)
        else:
            value = torch.tensor(float(loss), dtype=torch.float64)
        if self.total is None:
            self.total = value.clone()
        else:
            self.total = self.total + move(value, self.total.device)

    def take(self):
        """The summed loss (None if nothing was added); the sum starts again from zero."""
        total, self.total = self.total, None
        return total
