"""Where AdamL's telemetry is read: the loggers' one read (integrations.telemetry_metrics), the
Lightning callback and AdamLTrainer, which log it on logging steps only and log the figures of
the step they log, and the `adaml-experiments telemetry` page."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from adaml_kernels import AdamL
from adaml_kernels.integrations import find_adaml, telemetry_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

FIGURES = ("sgd_like_fraction", "update_rms", "lost_update_fraction", "saturated_fraction")


def _as_floats(opt):
    return [{k: float(v) for k, v in figures.items()} for figures in opt.telemetry()]


def test_telemetry_metrics_names_and_values():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))
    opt = AdamL([{"params": [a]}, {"params": [b], "lr": 0.1}], telemetry=True)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step(2.0)
    metrics = telemetry_metrics(opt)
    want = _as_floats(opt)
    for i in range(2):
        for key in FIGURES:
            assert metrics[f"adaml/group{i}/{key}"] == want[i][key]
    assert 0.0 <= metrics["adaml/group0/sgd_like_fraction"] <= 1.0
    assert metrics["adaml/group1/update_rms"] > 0.0
    one = AdamL([a], telemetry=True)
    a.grad = torch.randn_like(a)
    one.step(1.0)
    assert set(FIGURES) <= {k.split("/", 1)[1] for k in telemetry_metrics(one, prefix="adaml")}
    assert telemetry_metrics(AdamL([a])) == {}  # telemetry off: nothing to log


def test_lightning_logs_on_logging_steps_only(monkeypatch):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, TensorDataset

    from adaml_kernels.integrations import lightning as adapter

    class Recorder(Logger):
        name, version = "recorder", 0
        records = []

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            if any(k.startswith("adaml/") for k in metrics):
                self.records.append((step, dict(metrics)))

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),
                                           torch.nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return AdamL(self.parameters(), lr=0.03, telemetry=True)

    truth = {}  # optimizer step -> its figures, read by the test after every step

    class Truth(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            truth[trainer.global_step] = _as_floats(trainer.optimizers[0])[0]

    reads = []
    real = adapter.telemetry_metrics
    monkeypatch.setattr(adapter, "telemetry_metrics",
                        lambda *a, **k: reads.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=Recorder(),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accumulate_grad_batches=2,
                        callbacks=[adapter.AdamLCallback(),
                                   adapter.AdamLTelemetryCallback(every_n_steps=3), Truth()])
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=8))
    assert trainer.global_step == 8  # 8 micro-batches an epoch, 2 per step
    assert [step for step, _ in Recorder.records] == [3, 6]
    assert len(reads) == 2  # read on the two logging steps, never in between
    for step, metrics in Recorder.records:
        for key in FIGURES:
            assert metrics[f"adaml/{key}"] == truth[step][key]
    with pytest.raises(ValueError, match="every_n_steps"):
        adapter.AdamLTelemetryCallback(every_n_steps=0)


def test_transformers_trainer_logs_the_logged_steps_figures(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from adaml_kernels.integrations.transformers import AdamLTrainer

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (32, 8), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, max_steps=6,
        logging_steps=3, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, lr_scheduler_type="constant")
    trainer = AdamLTrainer(model=model, args=args, train_dataset=data,
                           optimizer_cls_and_kwargs=(AdamL, {"lr": 0.01, "telemetry": True}))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [3, 6]
    groups = len(find_adaml(trainer.optimizer).param_groups)  # Trainer makes decay / no-decay groups
    assert groups == 2
    for e in logged:
        for i in range(groups):
            assert 0.0 <= e[f"adaml/group{i}/sgd_like_fraction"] <= 1.0
            assert e[f"adaml/group{i}/update_rms"] > 0.0
    last = _as_floats(find_adaml(trainer.optimizer))  # step 6's figures: the last step taken
    for i in range(groups):
        for key in FIGURES:
            assert logged[-1][f"adaml/group{i}/{key}"] == last[i][key]
    assert logged[0]["adaml/group0/update_rms"] != logged[1]["adaml/group0/update_rms"]


def test_mode_summary_reads_the_trace():
    from adaml_kernels.experiments import telemetry

    def says(trace):
        return telemetry.describe({"sgd_like_fraction": trace})

    assert says([0.9, 0.8, 0.6]).startswith("SGD-like throughout")
    assert says([0.1, 0.0]).startswith("adaptive throughout")
    assert says([0.9, 0.6, 0.4, 0.2]).startswith("switches once, to adaptive at step 3")
    assert says([0.2, 0.6, 0.7]).startswith("switches once, to SGD-like at step 2")
    assert says([0.9, 0.4, 0.6, 0.3, 0.2]).startswith(
        "mixed: the share crosses one half 3 times; adaptive from step 4")


def test_experiment_page_quick(tmp_path):
    from adaml_kernels.experiments import cli

    assert cli.main(["telemetry", "--quick", "--page", str(tmp_path),
                     "--json", str(tmp_path / "r.json")]) == 0
    page = (tmp_path / "telemetry_results.md").read_text()
    assert (tmp_path / "telemetry_modes.png").stat().st_size > 0
    rows = [line for line in page.splitlines() if line.startswith("| char LSTM") or
            line.startswith("| GPT")]
    assert len(rows) == 2 * 3 * 2  # two models, three (gamma, phi), two eps
    import json

    result = json.load(open(tmp_path / "r.json"))
    for key, r in result["runs"].items():
        assert len(r["loss"]) == len(r["sgd_like_fraction"]) == result["config"]["steps"]
        assert all(0.0 <= v <= 1.0 for v in r["sgd_like_fraction"]), key
        assert all(math.isfinite(v) and v > 0 for v in r["update_rms"]), key
        assert r["summary"] in page
    # eps 1e-12 makes eps * l smaller: never more SGD-like than eps 1e-8 at the same setting
    for key, r in result["runs"].items():
        if key.endswith("|1e-12"):
            other = result["runs"][key.replace("|1e-12", "|1e-08")]
            assert sum(r["sgd_like_fraction"]) <= sum(other["sgd_like_fraction"]) + 1e-9
