"""accelerate adapter: ``backward(accelerator, loss, optimizer)`` in place of
``accelerator.backward(loss)``, then ``optimizer.step()`` without the loss.

    from adaml_kernels import AdamL
    from adaml_kernels.integrations.accelerate import backward

    accelerator = Accelerator(gradient_accumulation_steps=4, mixed_precision="bf16")
    model, optimizer = accelerator.prepare(model, AdamL(model.parameters(), lr=1e-3))
    for x, y in batches:
        with accelerator.accumulate(model):
            loss = loss_fn(model(x), y)
            backward(accelerator, loss, optimizer)
            optimizer.step()
            optimizer.zero_grad()

accelerate's ``AcceleratedOptimizer.step(closure=None)`` takes no loss (``step(loss=...)``
raises; ``step(loss)`` passes the loss as the closure, which AdamL accepts, but under
``accumulate()`` that is only the last micro-batch's loss). ``accelerator.backward`` divides the
loss by ``gradient_accumulation_steps`` before backpropagating it; ``backward`` here registers
that divided loss with AdamL's ``add_loss``, so at the step that ``accumulate()`` lets through
AdamL uses the sum over the window: the mean of its micro-batch losses, whose gradient is in
.grad. Under fp16 the registered loss is the unscaled one and accelerate's GradScaler hands its
scale and found_inf to AdamL. ``save_state``/``load_state`` save and load AdamL's state dict (f_1
and the skip count included) with the rest.
"""

from __future__ import annotations

import torch

from . import find_adaml

__all__ = ["backward"]


def backward(accelerator, loss: torch.Tensor, optimizer, **kwargs) -> None:
    """``accelerator.backward(loss, **kwargs)``, and register with the AdamL in `optimizer` (the
    prepared optimizer or the AdamL itself) the loss whose gradient that adds to .grad."""
    adaml = find_adaml(optimizer)
    if adaml is None:
        raise TypeError(f"backward() needs an AdamL optimizer, not {type(optimizer).__name__}")
    accelerator.backward(loss, **kwargs)
    # What accelerator.backward backpropagates (before any GradScaler scaling).
    adaml.add_loss(loss.detach() / accelerator.gradient_accumulation_steps)
