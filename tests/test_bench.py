"""Smoke tests of adaml-bench (the adaml_kernels/bench package). No timing is ever asserted."""

import json
import math
import runpy
import sys
import warnings

import pytest
import torch

from adaml_kernels import available_backends
from adaml_kernels.bench import cases, cli, contenders, goals, timing
from adaml_kernels.bench.rows import REQUIRED_KEYS

SMOKE = ["--device", "cpu", "--smoke", "--no-progress"]


def _measured(rows):
    return [r for r in rows if not r["skipped"]]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "bench.json", out / "bench.png"
    rc = cli.main(SMOKE + ["--sizes", "1000", "--json", str(json_path), "--plot", str(png_path)])
    return rc, json_path, png_path


def test_cli_writes_json_rows_with_the_required_keys(smoke_run):
    rc, json_path, _ = smoke_run
    assert rc == 0
    rows = json.loads(json_path.read_text())
    assert isinstance(rows, list) and rows
    for r in rows:
        for key in REQUIRED_KEYS:
            assert key in r, key
    measured = _measured(rows)
    assert {r["case"] for r in measured} == {"1000", "gpt2_small", "many_small"}
    for r in measured:
        for key in ("median_ms", "p10_ms", "p90_ms", "gbps", "copy_gbps", "pct_of_copy",
                    "vs_torch_fused"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["dtype"] == "float32" and r["bytes_per_param"] == 28
        assert r["bytes_moved"] == 28 * r["n_params"]
        assert r["n_tensors"] >= 1 and r["reps"] >= 2 and r["sets"] >= 1


def test_cli_measures_torch_adam_and_every_available_backend(smoke_run):
    _, json_path, _ = smoke_run
    rows = json.loads(json_path.read_text())
    for case in ("1000", "gpt2_small", "many_small"):
        names = {r["backend"] for r in _measured(rows) if r["case"] == case}
        expected = {"torch_fused", "torch_foreach"} | (set(available_backends("cpu")) - {"triton"})
        assert expected <= names, (case, names)
        fused = next(r for r in rows if r["case"] == case and r["backend"] == "torch_fused")
        assert fused["vs_torch_fused"] == pytest.approx(1.0)


def test_cli_writes_a_png(smoke_run):
    _, _, png_path = smoke_run
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_the_table_and_the_traffic_model(tmp_path, capsys):
    assert cli.main(SMOKE + ["--sizes", "1000", "--lists", "none"]) == 0
    out = capsys.readouterr().out
    assert "28 B/param" in out and "median ms" in out and "torch_fused" in out


def test_bf16_traffic_model(tmp_path):
    path = tmp_path / "bf16.json"
    args = SMOKE + ["--sizes", "1000", "--lists", "none", "--dtype", "bf16", "--json", str(path),
                    "--backends", "reference,torch_fused"]
    assert cli.main(args) == 0
    rows = {r["backend"]: r for r in json.loads(path.read_text())}
    assert set(rows) == {"reference", "torch_fused"}
    assert rows["reference"]["dtype"] == "bfloat16"
    assert rows["reference"]["bytes_per_param"] == 22  # 2+2+4+4 read, 2+4+4 written
    assert rows["torch_fused"]["bytes_per_param"] == 14  # torch keeps bf16 moments


def test_missing_matplotlib_and_tqdm_do_not_crash(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    png = tmp_path / "x.png"
    args = ["--device", "cpu", "--smoke", "--sizes", "1000", "--lists", "none",
            "--backends", "torch_fused", "--plot", str(png)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.out
    assert "tqdm is not installed" in captured.err
    assert not png.exists()


def test_memory_check_needs_cuda(capsys):
    assert cli.main(["--device", "cpu", "--memory-check"]) == 2
    assert "CUDA" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_check_on_cuda(tmp_path):
    path = tmp_path / "mem.json"
    args = ["--device", "cuda", "--memory-check", "--smoke", "--sizes", "4096", "--json", str(path)]
    assert cli.main(args) == 0
    rows = json.loads(path.read_text())
    assert {"torch_fused", "torch_foreach"} <= {r["backend"] for r in rows if not r["skipped"]}
    for r in rows:
        if not r["skipped"]:
            assert r["extra_peak_bytes"] >= 0 and r["state_bytes"] > 0


def test_workload_shapes():
    gpt2 = cases.gpt2_small_shapes()
    assert len(gpt2) == 148
    assert sum(math.prod(s) for s in gpt2) == 124_439_808
    small = cases.many_small_shapes()
    assert len(small) == 5000
    assert small == cases.many_small_shapes()  # deterministic
    assert max(math.prod(s) for s in small) <= 64 * 64 * 9


def test_parse_size_and_labels():
    assert cases.parse_size("1M") == 1 << 20
    assert cases.parse_size("1B") == cases.parse_size("1G") == 1 << 30
    assert cases.parse_size("4096") == 4096
    assert cases.parse_size("1e6") == 1_000_000
    assert cases.parse_size("1.5k") == 1536
    with pytest.raises(Exception):
        cases.parse_size("lots")
    assert cases.size_label(64 << 20) == "64M" and cases.size_label(1000) == "1000"


def test_traffic_model_and_rotation():
    assert contenders.traffic_per_param("adaml", torch.float32) == 28
    assert contenders.traffic_per_param("adaml", torch.bfloat16) == 22
    assert contenders.traffic_per_param("torch", torch.bfloat16) == 14
    cache = 32 << 20
    assert timing.rotation_sets(1 << 30, cache, 4) == 1  # one step evicts its own data
    assert timing.rotation_sets(28 << 20, cache, 4) == 4
    assert 2 <= timing.rotation_sets(100 << 20, cache, 4) <= 4


def test_bad_arguments_exit_with_usage_error():
    for args in (["--sizes", "lots"], ["--dtype", "int8"], ["--lists", "resnet"],
                 ["--backends", "sgd"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["--device", "cpu", "--smoke"] + args)
        assert info.value.code == 2


def test_runs_as_a_module(monkeypatch, capsys):
    """python -m adaml_kernels.bench (run in-process: a new interpreter would re-import torch)."""
    monkeypatch.setattr(sys, "argv", ["adaml-bench", "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as info:
        warnings.simplefilter("ignore", RuntimeWarning)  # bench is already imported here
        runpy.run_module("adaml_kernels.bench", run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--memory-check" in out


def test_cases_over_the_memory_budget_are_skipped_not_fatal(tmp_path, capsys):
    path = tmp_path / "tiny_budget.json"
    args = SMOKE + ["--sizes", "4096", "--lists", "none", "--memory-budget", "1e-12",
                    "--json", str(path)]
    assert cli.main(args) == 0
    rows = json.loads(path.read_text())
    assert rows and all(r["skipped"] and r["median_ms"] is None for r in rows)
    assert "memory budget" in capsys.readouterr().out


def test_goal_lines_read_the_rows():
    def row(case, backend, n, ms, pct):
        return {"case": case, "backend": backend, "dtype": "float32", "n_params": n,
                "median_ms": ms, "pct_of_copy": pct}

    big = 256 << 20
    rows = [row("256M", "cuda", big, 10.0, 93.0), row("256M", "triton", big, 10.5, 89.0),
            row("256M", "torch_fused", big, 10.2, 91.0),
            row("many_small", "cuda", 17_000_000, 1.0, 40.0),
            row("many_small", "torch_fused", 17_000_000, 1.2, 30.0)]
    lines = goals.goal_lines(rows, torch.device("cuda"))
    assert sum(line.startswith("PASS") for line in lines) == 3
    assert [line for line in lines if line.startswith("FAIL")] == [
        "FAIL  cuda >= 1.3x faster than torch fused on many_small: 1.20x"]
    cpu_rows = [row("1M", "cpu", 1 << 20, 1.06, 100.0), row("1M", "torch_fused", 1 << 20, 1.0, 1)]
    assert goals.goal_lines(cpu_rows, torch.device("cpu"))[0].startswith("FAIL")
