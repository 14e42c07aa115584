"""Lightning (``lightning.pytorch``) adapter: a Callback that hands AdamL the loss of each step.

    from adaml_kernels import AdamL
    from adaml_kernels.integrations.lightning import AdamLCallback

    class Model(L.LightningModule):
        ...
        def configure_optimizers(self):
            return AdamL(self.parameters(), lr=1e-3)

    trainer = L.Trainer(callbacks=[AdamLCallback()], accumulate_grad_batches=4,
                        precision="16-mixed", gradient_clip_val=1.0)

What it does, for the fit it is attached to:

- Every loss Lightning backpropagates is registered with ``add_loss``, unscaled: in automatic
  optimisation that is training_step's loss divided by ``accumulate_grad_batches`` (times the
  GradScaler's scale under "16-mixed", which is divided out again), in manual optimisation each
  ``self.manual_backward(loss)``. So AdamL's loss is the sum of the losses whose gradients are in
  .grad: under accumulation, the mean of the micro-batch losses.
- Automatic optimisation: ``optimizer.step(closure)`` runs Lightning's closure (forward and
  backward of the last micro-batch) and then steps with the registered sum, not with the
  closure's result (which is only the last micro-batch's share). A training_step that returns
  None registers nothing; a window with no backward at all is a no-op step.
- Manual optimisation: ``opt.step()`` uses the registered losses; ``opt.step(loss=...)`` still
  overrides them. With more than one optimizer (e.g. a GAN) a backward cannot be attributed to
  one, so nothing is registered: pass ``opt.step(loss=...)``, or call ``opt.add_loss(loss)``
  after each ``manual_backward`` yourself.
- ``gradient_clip_val``: Lightning refuses to clip for an optimizer that unscales in its step
  (``_step_supports_amp_scaling``), so for such a fit AdamL's amp_scaling is switched off (as
  ``AdamL(..., amp_scaling=False)``): under "16-mixed" GradScaler unscales before the clipping
  and skips overflowing steps itself; under "bf16-mixed" and "32" there is no GradScaler and the
  switch changes nothing else. The setting is restored when the fit ends.

``AdamLTelemetryCallback(every_n_steps=None)`` logs AdamL's telemetry (``AdamL(...,
telemetry=True)``, docs/telemetry.md) to every logger of the Trainer, as ``adaml/<figure>``,
every ``every_n_steps`` optimizer steps (default: the Trainer's ``log_every_n_steps``). The
figures stay on the device between logging steps; each logging step reads them in one transfer.
"""

from __future__ import annotations

import types

import torch
from lightning.pytorch.callbacks import Callback

from . import find_adaml, telemetry_metrics

__all__ = ["AdamLCallback", "AdamLTelemetryCallback"]


class AdamLCallback(Callback):
    """Registers every backpropagated loss with AdamL (see the module docstring)."""

    def __init__(self):
        self._adaml = None  # the fit's AdamL, if it is the fit's only optimizer
        self._undo = []  # callables that restore what on_fit_start changed

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._undo = []

    def on_fit_start(self, trainer, pl_module) -> None:
        adamls = [opt for opt in map(find_adaml, trainer.optimizers) if opt is not None]
        self._adaml = adamls[0] if len(trainer.optimizers) == 1 and adamls else None
        for opt in adamls:
            if trainer.gradient_clip_val and opt.amp_scaling:
                opt.amp_scaling = False
                self._undo.append(lambda opt=opt: setattr(opt, "_step_supports_amp_scaling", True))
        if self._adaml is not None and pl_module.automatic_optimization:
            self._undo.append(_step_with_registered_losses(self._adaml))

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self._adaml is not None:
            self._adaml.add_loss(_unscaled(loss, trainer.precision_plugin))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            for undo in reversed(self._undo):
                undo()
            self._undo, self._adaml = [], None


def _unscaled(loss: torch.Tensor, precision) -> torch.Tensor:
    """The loss without the GradScaler's scale that "16-mixed" multiplied it by (a power of two,
    so the division is exact); read on the device, no synchronisation."""
    scaler = getattr(precision, "scaler", None)
    loss = loss.detach()
    if scaler is None or not scaler.is_enabled():
        return loss
    scale = getattr(scaler, "_scale", None)  # the tensor scaler.scale() multiplied the loss by
    if scale is None:
        return loss / scaler.get_scale()
    return loss.to(torch.float32) / scale.to(loss.device)


def _step_with_registered_losses(opt):
    """Make ``opt.step(closure)`` run the closure and step with the registered losses; return
    the undo. Wraps whatever ``opt.step`` is now (an LR scheduler may have wrapped it already)
    and stays a bound method, so a scheduler made later can wrap it in turn."""
    had_own = "step" in opt.__dict__
    previous_own = opt.__dict__.get("step")
    previous = opt.step

    def step(self, closure=None, **kwargs):
        if closure is not None:
            with torch.enable_grad():
                closure()  # training_step and backward: registers the last micro-batch's loss
        return previous(**kwargs)  # no loss given: AdamL uses the registered sum

    if getattr(previous, "_wrapped_by_lr_sched", False):
        step._wrapped_by_lr_sched = True  # it still calls the scheduler's wrapper: no warning
    wrapped = types.MethodType(step, opt)
    opt.step = wrapped

    def undo():
        if opt.__dict__.get("step") is wrapped:
            if had_own:
                opt.step = previous_own
            else:
                del opt.step

    return undo


class AdamLTelemetryCallback(Callback):
    """Logs AdamL's telemetry every ``every_n_steps`` optimizer steps (see the module
    docstring); ``last`` holds the figures it logged last."""

    def __init__(self, every_n_steps: int | None = None, prefix: str = "adaml"):
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int or None, not {every_n_steps!r}")
        self.every_n_steps, self.prefix = every_n_steps, prefix
        self.last: dict[str, float] = {}
        self._logged_step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps so far
        every = self.every_n_steps or trainer.log_every_n_steps
        if step == 0 or step % every or step == self._logged_step:
            return  # not a logging step, or a micro-batch of a step already logged
        self._logged_step = step
        metrics = {}
        several = len(trainer.optimizers) > 1
        for i, opt in enumerate(trainer.optimizers):
            adaml = find_adaml(opt)
            if adaml is not None:  # (telemetry off: no figures)
                metrics.update(telemetry_metrics(
                    adaml, f"{self.prefix}/optimizer{i}" if several else self.prefix))
        if metrics:
            self.last = metrics
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
