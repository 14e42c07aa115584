"""The framework adapters (adaml_kernels.integrations) with the frameworks themselves.

Every test trains a tiny model built in the test on data made in memory (no downloads) and
checks that (1) training lowers the loss, (2) the loss AdamL used at every step equals the loss
of the gradients it was handed (under accumulation the sum of the micro-batch losses as the
framework backpropagated them, unscaled), and (3) a resume from a checkpoint continues bitwise as
the uninterrupted run. The loss AdamL used is read where step() hands it to the update.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from adaml_kernels import AdamL
from adaml_kernels.engine import StepEngine
from adaml_kernels.integrations import find_adaml

# No downloads, no telemetry (the frameworks are imported inside the tests, after this).
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
             "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

# ------------------------------------------------------------------------------- helpers


class LossSpy:
    """Records, at every step AdamL takes, the loss it uses and `expected()` evaluated then (with
    the parameters the gradients were taken at)."""

    def __init__(self, monkeypatch, expected=None):
        self.used, self.expected, self.grad_scales = [], [], []
        grad_scale = [None]  # what GradScaler handed the step being taken
        original_loss = StepEngine.step_loss

        def step_loss(engine, loss, group, device):
            # Where both of the engine's paths settle the loss of a step.
            loss_t = original_loss(engine, loss, group, device)
            self.used.append(float(loss_t))  # averaged over the ranks under DDP
            self.grad_scales.append(None if grad_scale[0] is None else float(grad_scale[0]))
            if expected is not None:
                self.expected.append(float(expected(len(self.used) - 1)))
            return loss_t

        def seeing_grad_scale(original):
            def path(engine, groups, state, loss, scale, found_inf):
                grad_scale[0] = scale
                return original(engine, groups, state, loss, scale, found_inf)
            return path

        monkeypatch.setattr(StepEngine, "step_loss", step_loss)
        for name in ("fast_step", "general_step"):
            monkeypatch.setattr(StepEngine, name, seeing_grad_scale(getattr(StepEngine, name)))

    def check(self, steps, rel=1e-6):
        assert len(self.used) == steps
        assert self.used == pytest.approx(self.expected, rel=rel)


def params_bytes(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(torch.uint8) if x.dtype != torch.bool else x,
                           y.view(torch.uint8) if y.dtype != torch.bool else y)


def regression_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x @ torch.randn(4, 1, generator=g)) + 0.5
    return x, y


def regression_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def autocast(precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def test_find_adaml_and_light_import():
    import subprocess
    import sys

    code = ("import sys, adaml_kernels.integrations; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'lightning', 'pytorch_lightning', 'transformers', 'accelerate'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    opt = AdamL([torch.nn.Parameter(torch.ones(2))])
    assert find_adaml(opt) is opt
    assert find_adaml(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)) is None


# ----------------------------------------------------------------------------- Lightning

BATCH, ACC = 8, 2  # 64 samples: 8 micro-batches, 4 steps an epoch


def _lightning():
    L = pytest.importorskip("lightning")
    from adaml_kernels.integrations.lightning import AdamLCallback

    class Regression(L.LightningModule):
        def __init__(self, manual=False, skip=(), acc=ACC, precision="32"):
            super().__init__()
            self.net = regression_net()
            self.automatic_optimization = not manual
            self.skip, self.acc, self.precision = set(skip), acc, precision

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            if batch_idx in self.skip:
                return None  # Lightning's documented way to skip a batch
            if self.automatic_optimization:
                return loss
            opt = self.optimizers()
            self.manual_backward(loss / self.acc)
            if (batch_idx + 1) % self.acc == 0:
                opt.step()
                opt.zero_grad()
            return None

        def configure_optimizers(self):
            opt = AdamL(self.parameters(), lr=0.03)
            # A scheduler wraps opt.step before the callback does (the lr does not change here).
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 100)}

        def expected(self, step, x, y):
            """The sum of the losses Lightning backpropagated for `step` (micro-batch losses
            divided by accumulate_grad_batches), as training computed them."""
            windows = len(x) // (BATCH * self.acc)
            total = 0.0
            for i in range(self.acc):
                b = (step % windows) * self.acc + i
                if b in self.skip:
                    continue
                with autocast(self.precision):
                    xb, yb = x[b * BATCH:(b + 1) * BATCH], y[b * BATCH:(b + 1) * BATCH]
                    total += float(F.mse_loss(self.net(xb), yb)) / self.acc
            return total

    return L, Regression, AdamLCallback


def _fit(L, model, x, y, *, epochs, precision="32", ckpt_path=None, callbacks=None, **kwargs):
    from torch.utils.data import DataLoader, TensorDataset

    plugins = []
    if precision == "fp16":  # "16-mixed" on the CPU: Lightning would use bf16, so hand it fp16
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=256.0))]
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, plugins=plugins,
        precision="bf16-mixed" if precision == "bf16" else None, callbacks=callbacks, **kwargs)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=BATCH), ckpt_path=ckpt_path)
    return trainer


def _full_loss(net, x, y):
    with torch.no_grad():
        return float(F.mse_loss(net(x), y))


@pytest.mark.parametrize("precision,clip", [("32", None), ("bf16", 1.0), ("fp16", None),
                                            ("fp16", 1.0)])
def test_lightning_automatic(monkeypatch, tmp_path, precision, clip):
    L, Regression, AdamLCallback = _lightning()
    x, y = regression_data()
    model = Regression(precision=precision)
    spy = LossSpy(monkeypatch, lambda k: model.expected(k, x, y))
    before = _full_loss(model.net, x, y)
    kwargs = {"precision": precision, "accumulate_grad_batches": ACC, "gradient_clip_val": clip}
    _fit(L, model, x, y, epochs=2, callbacks=[AdamLCallback()], **kwargs)
    assert _full_loss(model.net, x, y) < 0.7 * before  # (1)
    spy.check(steps=8)  # (2)
    if precision == "fp16":  # the kernel unscales, or GradScaler did before the clipping
        assert spy.grad_scales == ([None] * 8 if clip else [256.0] * 8)
    opt = model.trainer.optimizers[0]  # restored: amp_scaling, and the scheduler's opt.step
    assert opt.amp_scaling and opt.step._wrapped_by_lr_sched

    # (3) resume: one epoch, a checkpoint, a new Trainer for the second epoch
    first = Regression(precision=precision)
    trainer = _fit(L, first, x, y, epochs=1, callbacks=[AdamLCallback()], **kwargs)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Regression(precision=precision)
    _fit(L, resumed, x, y, epochs=2, callbacks=[AdamLCallback()],
         ckpt_path=tmp_path / "epoch1.ckpt", **kwargs)
    assert_bitwise(params_bytes(resumed), params_bytes(model))
    assert float(resumed.trainer.optimizers[0].initial_loss) == spy.used[0]


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_lightning_training_step_returning_none(monkeypatch):
    L, Regression, AdamLCallback = _lightning()
    x, y = regression_data()
    # Micro-batches 2 and 7 are skipped (their windows step with the loss of 3, or 6, alone:
    # without the callback a None at the end of a window raised); 4 and 5 are both skipped (a
    # window without a backward: no step at all).
    model = Regression(skip={2, 4, 5, 7})
    spy = LossSpy(monkeypatch, lambda k: model.expected([0, 1, 3, 0, 1, 3][k], x, y))
    before = _full_loss(model.net, x, y)
    _fit(L, model, x, y, epochs=2, callbacks=[AdamLCallback()], accumulate_grad_batches=ACC)
    assert _full_loss(model.net, x, y) < before
    spy.check(steps=6)
    monkeypatch.undo()
    # Without the callback (and without accumulation) a None is a no-op step as well.
    model = Regression(skip={0, 3}, acc=1)
    _fit(L, model, x, y, epochs=1)
    assert float(model.trainer.optimizers[0].state[model.net[0].weight]["step"]) == 6


def test_lightning_manual(monkeypatch, tmp_path):
    L, Regression, AdamLCallback = _lightning()
    x, y = regression_data()
    # opt.step() after accumulating two manual_backward calls: the callback registered both.
    model = Regression(manual=True)
    spy = LossSpy(monkeypatch, lambda k: model.expected(k, x, y))
    before = _full_loss(model.net, x, y)
    _fit(L, model, x, y, epochs=2, callbacks=[AdamLCallback()])
    assert _full_loss(model.net, x, y) < 0.7 * before
    spy.check(steps=8)
    first = Regression(manual=True)
    trainer = _fit(L, first, x, y, epochs=1, callbacks=[AdamLCallback()])
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Regression(manual=True)
    _fit(L, resumed, x, y, epochs=2, callbacks=[AdamLCallback()],
         ckpt_path=tmp_path / "epoch1.ckpt")
    assert_bitwise(params_bytes(resumed), params_bytes(model))


def test_lightning_manual_explicit_loss_without_callback(monkeypatch):
    L, _, _ = _lightning()
    x, y = regression_data()

    class Explicit(L.LightningModule):  # opt.step(loss=...): Lightning adds a closure anyway
        def __init__(self):
            super().__init__()
            self.net = regression_net()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = F.mse_loss(self.net(batch[0]), batch[1])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step(loss=loss)

        def configure_optimizers(self):
            return AdamL(self.parameters(), lr=0.03)

    model = Explicit()
    batch = lambda t, k: t[k % 8 * BATCH:][:BATCH]  # noqa: E731  (step k took batch k % 8)
    spy = LossSpy(monkeypatch, lambda k: F.mse_loss(model.net(batch(x, k)), batch(y, k)))
    before = _full_loss(model.net, x, y)
    _fit(L, model, x, y, epochs=2)
    assert _full_loss(model.net, x, y) < 0.7 * before
    spy.check(steps=16)


def test_fabric(monkeypatch):
    L = pytest.importorskip("lightning")
    x, y = regression_data()
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    net = regression_net()
    model, opt = fabric.setup(net, AdamL(net.parameters(), lr=0.03))
    expected = []
    spy = LossSpy(monkeypatch, lambda k: expected[k])
    before = _full_loss(net, x, y)
    for epoch in range(2):
        for w in range(4):  # accumulate two micro-batches per step
            total = 0.0
            for i in range(ACC):
                b = w * ACC + i
                with fabric.no_backward_sync(model, enabled=i < ACC - 1):
                    loss = F.mse_loss(model(x[b * 8:(b + 1) * 8]), y[b * 8:(b + 1) * 8]) / ACC
                    fabric.backward(loss)
                opt.add_loss(loss)
                total += float(loss.detach())
            expected.append(total)
            opt.step()
            opt.zero_grad()
    assert _full_loss(net, x, y) < 0.7 * before
    spy.check(steps=8)


# ------------------------------------------------------------------------ transformers Trainer


def _gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _token_data(n=32, length=8, seed=0):
    """Sequences a model can learn: each token is 3 * the previous + 1, mod 50."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 50, (n, 1), generator=g)
    ids = [start]
    for _ in range(length - 1):
        ids.append((ids[-1] * 3 + 1) % 50)
    ids = torch.cat(ids, dim=1)
    return [{"input_ids": row, "labels": row} for row in ids]


def _lm_loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("precision,loss_kwargs", [("32", True), ("32", False), ("bf16", True)])
def test_transformers_trainer(monkeypatch, tmp_path, precision, loss_kwargs):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from adaml_kernels.integrations.transformers import AdamLTrainer

    windows, counts = {}, {}  # global_step -> its micro-batches' input_ids, Trainer's token count

    class Recording(AdamLTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            windows.setdefault(self.state.global_step, []).append(inputs["input_ids"].clone())
            counts[self.state.global_step] = num_items_in_batch
            return super().training_step(model, inputs, num_items_in_batch)

    data = _token_data()
    all_ids = torch.stack([d["input_ids"] for d in data])

    def make(run):
        model = _gpt2()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / run), use_cpu=True, bf16=precision == "bf16", seed=0,
            per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=8,
            lr_scheduler_type="constant", save_strategy="steps", save_steps=4,
            logging_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0)
        trainer = Recording(model=model, args=args, train_dataset=data,
                            optimizer_cls_and_kwargs=(AdamL, {"lr": 0.02}))
        if not loss_kwargs:  # Trainer then divides each micro-batch loss by the step's count
            trainer.model_accepts_loss_kwargs = False
        return model, trainer

    def expected(step):
        """The loss of the accumulated batch, as Trainer backpropagates it: the sum of its token
        losses over Trainer's token count when the model takes num_items_in_batch, else their
        mean (every micro-batch has as many tokens). transformers 5.24 counts every label of
        GPT2LMHeadModel, 8 a sequence, of which the model predicts 7 (see docs/frameworks.md)."""
        ids = torch.cat(windows[step])
        predicted = ids.shape[0] * (ids.shape[1] - 1)
        count = int(counts[step]) if loss_kwargs else predicted
        return _lm_loss(model, ids) * predicted / count

    model, trainer = make("full")
    spy = LossSpy(monkeypatch, lambda k: expected(trainer.state.global_step))
    before = _lm_loss(model, all_ids)
    trainer.train()
    assert _lm_loss(model, all_ids) < 0.8 * before  # (1)
    spy.check(steps=8, rel=2e-2 if precision == "bf16" else 1e-5)  # (2)
    assert all(len(w) == 2 for w in windows.values())

    resumed, trainer = make("resumed")  # (3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert_bitwise(params_bytes(resumed), params_bytes(model))


def test_transformers_trainer_refuses_other_optimizers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from adaml_kernels.integrations.transformers import AdamLTrainer

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1,
                                          report_to="none", disable_tqdm=True)
    trainer = AdamLTrainer(model=_gpt2(), args=args, train_dataset=_token_data(4))
    with pytest.raises(TypeError, match="AdamLTrainer needs an AdamL optimizer"):
        trainer.train()


# ---------------------------------------------------------------------------------- accelerate


def _accelerate(precision, amp_scaling=True):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is a singleton
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACC,
                              mixed_precision="bf16" if precision == "bf16" else "no")
    if precision == "fp16":
        # accelerate has no fp16 on the CPU; give it the GradScaler it makes for fp16 on a GPU
        # (the loop then runs as under fp16 there, without the fp16 autocast).
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    net = regression_net()
    model, opt = accelerator.prepare(net, AdamL(net.parameters(), lr=0.03,
                                                amp_scaling=amp_scaling))
    return accelerator, net, model, opt


def _accelerate_epoch(accelerator, model, opt, x, y, poison=()):
    from adaml_kernels.integrations.accelerate import backward

    for b in range(len(x) // BATCH):
        with accelerator.accumulate(model):
            out = model(x[b * BATCH:(b + 1) * BATCH])
            if b in poison:  # overflowing gradients, a finite loss
                out.register_hook(lambda g: g * math.inf)
            loss = F.mse_loss(out, y[b * BATCH:(b + 1) * BATCH])
            backward(accelerator, loss, opt)
            opt.step()
            opt.zero_grad()


def _window_loss(net, x, y, window, precision):
    """The sum of the window's micro-batch losses over ACC, as accelerator.backward took them."""
    total = 0.0
    for b in range(window * ACC, (window + 1) * ACC):
        with autocast("bf16" if precision == "bf16" else "32"):  # as the prepared forward
            total += float(F.mse_loss(net(x[b * BATCH:(b + 1) * BATCH]),
                                      y[b * BATCH:(b + 1) * BATCH])) / ACC
    return total


@pytest.mark.parametrize("precision", ["32", "bf16", "fp16"])
def test_accelerate(monkeypatch, tmp_path, precision):
    x, y = regression_data()
    accelerator, net, model, opt = _accelerate(precision)
    spy = LossSpy(monkeypatch, lambda k: _window_loss(net, x, y, k % 4, precision))
    before = _full_loss(net, x, y)
    _accelerate_epoch(accelerator, model, opt, x, y)
    accelerator.save_state(str(tmp_path / "epoch1"))
    _accelerate_epoch(accelerator, model, opt, x, y)
    assert _full_loss(net, x, y) < 0.7 * before  # (1)
    spy.check(steps=8)  # (2)
    assert spy.grad_scales == [256.0 if precision == "fp16" else None] * 8
    done = params_bytes(net)

    accelerator, net, model, opt = _accelerate(precision)  # (3)
    accelerator.load_state(str(tmp_path / "epoch1"))
    _accelerate_epoch(accelerator, model, opt, x, y)
    assert_bitwise(params_bytes(net), done)


@pytest.mark.parametrize("amp_scaling", [True, False])
def test_accelerate_overflowing_step_is_skipped(monkeypatch, amp_scaling):
    # A step whose gradients overflow is skipped: by AdamL (amp_scaling=True, GradScaler hands it
    # found_inf) or by GradScaler itself (amp_scaling=False). Either way the next step uses only
    # its own losses.
    x, y = regression_data()
    accelerator, net, model, opt = _accelerate("fp16", amp_scaling=amp_scaling)
    windows = [0, 1, 2, 3] if amp_scaling else [0, 1, 3]  # the steps that reach AdamL
    spy = LossSpy(monkeypatch, lambda k: _window_loss(net, x, y, windows[k], "fp16"))
    _accelerate_epoch(accelerator, model, opt, x, y, poison={5})  # window 2
    if amp_scaling:
        assert len(spy.used) == 4 and spy.used[2] == pytest.approx(spy.expected[2])
        del spy.used[2], spy.expected[2]
        assert opt.optimizer.skipped_steps == 1
    else:
        assert opt.optimizer.skipped_steps == 0
    assert opt.step_was_skipped is False and spy.used == pytest.approx(spy.expected, rel=1e-6)
    assert len(spy.used) == 3


def _trainer_ddp_rank(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    import transformers

    from adaml_kernels.integrations.transformers import AdamLTrainer

    windows, counts, used, expected, registered = [], {}, [], [], []

    class Recording(AdamLTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            windows.append((self.state.global_step, inputs["input_ids"].clone()))
            counts[self.state.global_step] = int(num_items_in_batch)
            return super().training_step(model, inputs, num_items_in_batch)

    model = _gpt2()
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, "out"), use_cpu=True, ddp_backend="gloo", seed=0,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
        lr_scheduler_type="constant", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = Recording(model=model, args=args, train_dataset=_token_data(),
                        optimizer_cls_and_kwargs=(AdamL, {"lr": 0.02}))
    original = StepEngine.step_loss

    def step_loss(engine, loss, group, device):
        loss_t = original(engine, loss, group, device)
        step = trainer.state.global_step
        ids = torch.cat([w for s, w in windows if s == step])
        # This rank's sum of token losses; all ranks' sum over Trainer's (global) token count.
        local = torch.tensor(_lm_loss(model, ids) * ids.shape[0] * (ids.shape[1] - 1),
                             dtype=torch.float64)
        dist.all_reduce(local)
        used.append(float(loss_t))
        registered.append(float(loss))  # this rank's sum, before AdamL averages it
        expected.append(float(local) / counts[step])
        return loss_t

    StepEngine.step_loss = step_loss
    trainer.train()
    torch.save({"used": used, "expected": expected, "registered": registered,
                "world": dist.get_world_size(), "params": [p.detach() for p in model.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_transformers_trainer_ddp(tmp_path):
    # Two CPU processes (gloo): Trainer multiplies each rank's loss by the world size under
    # average_tokens_across_devices and DDP averages the gradients; AdamL's average of the
    # ranks' losses is the loss of the whole accumulated global batch.
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: forked children hung when earlier tests of this module (the accelerate
    # ones) had run in the parent, even with accelerate's process-wide state reset in them.
    mp.start_processes(_trainer_ddp_rank, args=(2, port, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["registered"] != ranks[1]["registered"]
    for r in ranks:
        assert len(r["used"]) == 4
        assert r["used"] == pytest.approx(r["expected"], rel=1e-5)
    assert ranks[0]["used"] == ranks[1]["used"]
    assert_bitwise(ranks[0]["params"], ranks[1]["params"])
