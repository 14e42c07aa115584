"""Smoke tests of `adaml-experiments ... --quick`, and checks of the experiments' parts."""

import json
import math

import pytest
import torch

from adaml_kernels.experiments import cli, digits, functions, report, wgan
from adaml_kernels.experiments.common import OPTIMIZERS, verdict


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Each subcommand once, in quick mode, through the console script's main()."""
    out = tmp_path_factory.mktemp("quick")
    results = {}
    for name in cli.EXPERIMENTS:
        js, png = out / f"{name}.json", out / f"{name}.png"
        argv = [name, "--quick", "--seeds", "2", "--json", str(js), "--plot", str(png)]
        assert cli.main(argv) == 0
        results[name] = json.loads(js.read_text())
        assert png.stat().st_size > 1000
    return out, results


def test_quick_runs_record_machine_and_backend(quick):
    _, results = quick
    for name, r in results.items():
        meta = r["meta"]
        assert meta["experiment"] == name and meta["quick"] is True
        assert meta["machine"]["adaml_backend"] in ("reference", "cpu", "triton", "cuda")
        assert r["seeds"] == 2


def test_functions_quick(quick):
    out, results = quick
    r = results["functions"]
    assert set(r["problems"]) == {"camel", "rosenbrock"}
    for res in r["problems"].values():
        assert set(res["best"]) == set(OPTIMIZERS) == set(res["grid"])
        for opt, runs in res["grid"].items():
            assert [x["lr"] for x in runs] == r["lrs"]
            for x in runs:
                assert _finite(x["best_gap"]) and x["best_gap"] >= 0
                assert x["stop"] in ("tol", "stationary", "budget", "diverged")
                assert x["iters_to_tol"] is None or 0 <= x["iters_to_tol"] <= r["budget"]
        assert all(len(p) == 1 for p in res["perturbed"].values())  # seeds - 1 perturbed starts
        sw = res["sweep"]
        assert len(sw["best_gap"]) == len(r["phis"]) and len(sw["best_gap"][0]) == len(r["gammas"])
    assert (out / "functions_sweep.png").exists()


@pytest.mark.parametrize("name, curve, final", [("digits", "test_acc", "final_acc"),
                                                ("lstm", "val_ppl", "final_ppl"),
                                                ("wgan", "mmd", "final_mmd")])
def test_network_quick(quick, name, curve, final):
    _, results = quick
    r = results[name]
    assert set(OPTIMIZERS) <= set(r["runs"])
    for opt, run in r["runs"].items():
        stats = run[curve]
        assert len(stats["mean"]) == len(stats["std"]) > 0
        assert all(_finite(v) for v in stats["mean"] + stats["std"])
        assert len(run[final]) == 2 and all(_finite(v) for v in run[final])
        m, s = run[final + "_mean_std"]
        assert _finite(m) and _finite(s) and s >= 0
    assert set(r["verdicts"]) == set(r["runs"]) - {"AdamL"}
    assert set(r["verdicts"].values()) <= {"win", "tie", "loss"}


def test_digits_quick_schedules_and_sweep(quick):
    out, results = quick
    r = results["digits"]
    assert r["runs"]["AdamL"]["decay"] is False
    assert all(r["runs"][n]["decay"] for n in ("Adam", "EAdam", "AdaBelief"))
    assert all(0 <= a <= 1 for a in r["runs"]["AdamL"]["final_acc"])
    acc = r["sweep"]["final_acc"]
    assert len(acc) == len(r["phis"]) and all(0 <= a <= 1 for row in acc for a in row)
    assert (out / "digits_sweep.png").exists()


def test_lstm_quick_runs_the_eps_ablation(quick):
    _, results = quick
    r = results["lstm"]
    abl = r["eps_ablation"]
    assert abl["eps"] < r["eps"]
    assert set(abl["runs"]) == set(OPTIMIZERS) and set(abl["verdicts"]) == set(OPTIMIZERS[1:])
    for run in abl["runs"].values():
        assert all(_finite(v) and v > 1 for v in run["final_ppl"])  # perplexity > 1


def test_wgan_quick_records_the_loss_bound(quick):
    _, results = quick
    r = results["wgan"]
    assert r["adaml_loss_offset"] < 0
    assert _finite(r["runs"]["AdamL"]["min_loss_minus_fstar"])
    assert all(0 <= m <= r["modes"] for m in r["runs"]["AdamL"]["modes"]["mean"])


def test_report_renders_from_quick_results(quick):
    _, results = quick
    figures = {"functions": ["functions.png", "functions_sweep.png"],
               "digits": ["digits.png", "digits_sweep.png"], "lstm": ["lstm.png"],
               "wgan": ["wgan.png"]}
    page = report.render(results, figures, "adaml-experiments report --quick", quick=True)
    assert page.startswith("# AdamL against Adam, EAdam and AdaBelief")
    assert "adaml-experiments report --quick" in page and "Quick mode" in page
    assert "backend" in page
    for fig in sum(figures.values(), []):
        assert f"]({fig})" in page
    assert page.count("| Three-Hump Camel |") == 1 and "| WGAN-GP |" in page
    assert "char LSTM, eps 1e-12" in page


# ------------------------------------------------------------------------ building blocks

@pytest.mark.parametrize("name", ["camel", "rosenbrock"])
def test_closed_form_gradients_match_autograd(name):
    prob = functions.PROBLEMS[name]
    for x, y in [(0.0, -4.0), (-2.0, 2.0), (1.3, -0.7), (0.5, 0.25)]:
        xy = torch.tensor([x, y], dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(prob["f"](xy[0], xy[1]), xy)
        assert prob["grad"](x, y) == pytest.approx(g.tolist(), rel=1e-12, abs=1e-12)
    assert prob["f"](*prob["xstar"]) == 0.0


def test_camel_local_minimum_and_a_run_to_the_global_one():
    x, y = functions.CAMEL_LOCAL[0]
    assert math.hypot(*functions.camel_grad(x, y)) < 1e-3  # a stationary point ...
    assert functions.camel(x, y) == pytest.approx(0.2986, abs=1e-4)  # ... above f* = 0
    r = functions.minimize("camel", "Adam", 0.3, 1000, (0.0, -4.0), keep_path=False)
    assert r["stop"] == "tol" and r["minimum"] == "global" and r["best_gap"] < functions.TOL


def test_wgan_quality_measures():
    c = wgan.centers()
    on_modes = c.repeat(16, 1)
    assert wgan.coverage(on_modes) == (8, 1.0)
    assert wgan.coverage(c[:1].repeat(64, 1)) == (1, 1.0)  # mode collapse
    assert wgan.mmd2(on_modes, on_modes) == pytest.approx(0.0, abs=1e-6)
    far = on_modes + 10.0
    assert wgan.mmd2(on_modes, far) > wgan.mmd2(on_modes, on_modes + 0.01)


def test_digits_training_is_reproducible():
    x_tr, y_tr, x_te, y_te = digits.load_data()
    data = (x_tr[:128], y_tr[:128], x_te[:64], y_te[:64])
    a = digits.train("AdamL", 3, 1, data, decay=False)
    b = digits.train("AdamL", 3, 1, data, decay=False)
    assert a == b


def test_verdict_rule():
    assert verdict([0.9, 0.91, 0.92], [0.80, 0.81, 0.82], higher_is_better=True) == "win"
    assert verdict([0.9, 0.91, 0.92], [0.80, 0.81, 0.82], higher_is_better=False) == "loss"
    assert verdict([0.9, 0.95, 0.85], [0.89, 0.9, 0.91], higher_is_better=True) == "tie"


def test_precision_quick_writes_its_page(tmp_path):
    from adaml_kernels.experiments import precision

    js = tmp_path / "precision.json"
    argv = ["precision", "--quick", "--seeds", "2", "--json", str(js), "--page", str(tmp_path)]
    assert cli.main(argv) == 0
    r = json.loads(js.read_text())
    assert list(r["by_lr"]) == ["0.001"]
    runs = r["by_lr"]["0.001"]
    assert set(runs) == set(precision.MODES)
    for run in runs.values():
        assert len(run["final_loss"]) == 2 and all(_finite(v) for v in run["final_loss"])
        assert run["verdict"] in ("same as fp32", "worse than fp32", "better than fp32")
    # bf16 moments halve the moments' bytes; master weights add a float32 copy
    assert runs["fp32 + bf16 moments"]["state_bytes"] * 2 == runs["fp32"]["state_bytes"]
    assert runs["bf16 + master weights"]["state_bytes"] > runs["fp32"]["state_bytes"]
    walk = r["walk"]
    assert walk["bf16, round to nearest"]["min"] == walk["bf16, round to nearest"]["max"] == 1.0
    assert abs(walk["fp32"]["mean"] - 0.9) < 0.01
    assert abs(walk["bf16 + stochastic rounding"]["mean"] - walk["fp32"]["mean"]) < 0.002
    page = (tmp_path / "precision.md").read_text()
    assert page.startswith("# Low-precision training with AdamL") and "Quick mode" in page
    assert "](precision.png)" in page and (tmp_path / "precision.png").stat().st_size > 1000
    assert page.count("| bf16 + master weights |") == 2  # the walk table and the LSTM table
