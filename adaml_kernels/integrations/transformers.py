"""transformers adapter: a Trainer that hands AdamL the loss of each optimizer step.

    from adaml_kernels import AdamL
    from adaml_kernels.integrations.transformers import AdamLTrainer

    trainer = AdamLTrainer(
        model=model, args=TrainingArguments(..., gradient_accumulation_steps=4),
        train_dataset=train_dataset,
        optimizer_cls_and_kwargs=(AdamL, {"lr": 1e-3}),  # or optimizers=(AdamL(...), None)
    )
    trainer.train()  # and trainer.train(resume_from_checkpoint=...)

Trainer calls ``optimizer.step()`` without the loss. AdamLTrainer registers with ``add_loss``
the loss of every micro-batch exactly as Trainer backpropagated it, which is what
``training_step`` returns: in transformers 5 the micro-batch loss divided by the number of
micro-batches of the step, or, for a model that takes ``num_items_in_batch`` (most causal LMs),
the sum of its token losses divided by the token count of the whole accumulated batch (times the
number of processes when Trainer averages tokens across devices, which DDP's gradient averaging
and AdamL's loss averaging undo). So the loss AdamL uses is the sum of the registered losses: the
loss of the accumulated batch, whose gradient is in .grad. Under fp16, Trainer's GradScaler
scales inside ``accelerator.backward``; the returned loss is unscaled, and the GradScaler hands
its scale to AdamL (amp_scaling=True, which also works with Trainer's gradient clipping).

With ``AdamL(..., telemetry=True)`` AdamLTrainer adds AdamL's telemetry (docs/telemetry.md) to
Trainer's training logs as ``adaml/<figure>``: on Trainer's logging steps only (``logging_steps``),
so every callback that reports logs (TensorBoard, W&B, the console) gets them, and no other step
reads them.
"""

from __future__ import annotations

from transformers import Trainer

from . import find_adaml, telemetry_metrics

__all__ = ["AdamLTrainer"]

_NEEDS_ADAML = (
    "AdamLTrainer needs an AdamL optimizer: pass optimizer_cls_and_kwargs=(AdamL, {...}) or "
    "optimizers=(AdamL(model.parameters(), ...), None)"
)


class AdamLTrainer(Trainer):
    """transformers.Trainer whose optimizer, an AdamL, gets the loss of each step (see the
    module docstring)."""

    _adaml_window = None  # global_step of the accumulation window whose losses are registered

    def training_step(self, model, inputs, num_items_in_batch=None):
        adaml = find_adaml(self.optimizer)
        if adaml is None:
            raise TypeError(f"{_NEEDS_ADAML}, not {type(self.optimizer).__name__}")
        if self._adaml_window != self.state.global_step:
            # First micro-batch of a step. Trainer has already zeroed the gradients (with
            # model.zero_grad(), which AdamL does not see); this also drops losses that a step
            # GradScaler skipped before reaching AdamL (amp_scaling=False) left registered.
            adaml.zero_grad()
            self._adaml_window = self.state.global_step
        loss = super().training_step(model, inputs, num_items_in_batch)
        adaml.add_loss(loss)  # the tensor Trainer backpropagated, detached
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        adaml = find_adaml(self.optimizer)
        if adaml is not None and "loss" in logs:  # a training log, not an evaluation's
            logs = {**logs, **telemetry_metrics(adaml)}
        super().log(logs, *args, **kwargs)
