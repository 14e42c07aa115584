"""Smoke tests of adaml-bench (the adaml_kernels/bench package). No timing is ever asserted."""

import json
import math
import runpy
import sys
import warnings

import pytest
import torch

from adaml_kernels import available_backends
from adaml_kernels.bench import cases, cli, contenders, fsdp, goals, host_overhead, timing
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
        # float32: 28 B/param, 20 B/param with bf16 moments (modes bf16m, bf16m+sr), 16.0625
        # with 8-bit moments (a code and 1/256 of a float32 scale each)
        assert r["dtype"] == "float32"
        mode = r["mode"] or ""
        assert r["bytes_per_param"] == (
            20 if mode.startswith("bf16m") else 16.0625 if mode == "8bit" else 28)
        assert r["bytes_moved"] == r["bytes_per_param"] * r["n_params"]
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


def test_low_precision_modes_run_where_they_apply(tmp_path):
    # adaml-bench --dtype bfloat16 measures each mode with its bytes per parameter
    path = tmp_path / "modes.json"
    args = SMOKE + ["--sizes", "1000", "--lists", "none", "--dtype", "bf16,fp16,fp32",
                    "--backends", "cpu,torch_fused", "--json", str(path)]
    if "cpu" not in available_backends("cpu"):
        pytest.skip("needs the cpu backend")
    assert cli.main(args) == 0
    rows = json.loads(path.read_text())
    got = {(r["dtype"], r["backend"]): r["bytes_per_param"] for r in _measured(rows)}
    assert got == {
        ("bfloat16", "cpu"): 22, ("bfloat16", "cpu+sr"): 22, ("bfloat16", "cpu+master"): 28,
        ("bfloat16", "cpu+bf16m"): 14, ("bfloat16", "cpu+bf16m+sr"): 14,
        ("bfloat16", "cpu+master+bf16m+sr"): 20, ("bfloat16", "torch_fused"): 14,
        ("float16", "cpu"): 22, ("float16", "cpu+master"): 28, ("float16", "cpu+bf16m"): 14,
        ("float16", "cpu+master+bf16m+sr"): 20, ("float16", "torch_fused"): 14,
        ("float32", "cpu"): 28, ("float32", "cpu+bf16m"): 20, ("float32", "cpu+bf16m+sr"): 20,
        ("float32", "torch_fused"): 28,
        ("bfloat16", "cpu+8bit"): 10.0625, ("float16", "cpu+8bit"): 10.0625,
        ("float32", "cpu+8bit"): 16.0625,
        ("bfloat16", "cpu+telemetry"): 22, ("float16", "cpu+telemetry"): 22,
        ("float32", "cpu+telemetry"): 28,
    }
    assert {r["mode"] for r in rows if r["backend"].startswith("cpu")} == {
        "default", "sr", "master", "bf16m", "bf16m+sr", "master+bf16m+sr", "8bit", "telemetry"}
    path2 = tmp_path / "default.json"
    assert cli.main(args[:-1] + [str(path2), "--modes", "default"]) == 0
    assert {r["backend"] for r in json.loads(path2.read_text())} == {"cpu", "torch_fused"}


def test_mode_goals_scale_with_bytes():
    rows = [
        dict(case="16M", dtype="float32", backend="torch_fused", mode=None, median_ms=10.0,
             bytes_per_param=28, vs_torch_fused=1.0),
        dict(case="16M", dtype="float32", backend="cpu+bf16m", mode="bf16m", median_ms=7.0,
             bytes_per_param=20, vs_torch_fused=0.70),
        dict(case="16M", dtype="float32", backend="cpu+bf16m+sr", mode="bf16m+sr",
             median_ms=9.0, bytes_per_param=20, vs_torch_fused=0.90),
    ]
    lines = goals.mode_goal_lines(rows)
    assert lines[0].startswith("PASS  cpu+bf16m time / torch fused <= 1.05 x bytes 20/28")
    assert lines[1].startswith("FAIL  cpu+bf16m+sr") and "limit 0.750" in lines[1]


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
                 ["--backends", "sgd"], ["--modes", "fp8"]):
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
    assert "--quick" in out and "--memory-check" in out and "--host-overhead" in out


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


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("host") / "host.json"
    threads = torch.get_num_threads()
    rc = cli.main(SMOKE + ["--host-overhead", "--json", str(path)])
    return rc, json.loads(path.read_text()), threads


def test_host_overhead_rows(host_run):
    rc, rows, _ = host_run
    assert rc == 0
    fused_adaml = {"cpu"} & set(available_backends("cpu"))  # triton is skipped on the CPU
    for n in host_overhead.SMOKE_COUNTS:
        names = {r["backend"] for r in _measured(rows) if r["n_tensors"] == n}
        assert {"torch_fused", "torch_foreach"} | fused_adaml <= names, (n, names)
        assert "reference" not in names  # not fused: only when asked for
    for r in rows:
        for key in host_overhead.HOST_KEYS + REQUIRED_KEYS:
            assert key in r, key
    for r in _measured(rows):
        assert r["kind"] == "host" and r["threads"] == 1 and r["grads"] == "replaced every step"
        assert r["n_params"] == r["n_tensors"] and r["reps"] >= 2
        for key in ("us_per_step", "p10_us", "p90_us", "host_us", "us_per_tensor",
                    "vs_torch_fused"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["us_per_tensor"] == pytest.approx(r["us_per_step"] / r["n_tensors"])
        assert r["us_per_step"] == pytest.approx(1e3 * r["median_ms"])
        if r["backend"] == "torch_fused":
            assert r["vs_torch_fused"] == pytest.approx(1.0)


def test_host_overhead_restores_the_thread_count(host_run):
    assert torch.get_num_threads() == host_run[2]


def test_host_overhead_prints_table_and_goals(capsys):
    args = SMOKE + ["--host-overhead", "1,3", "--backends", "reference,torch_fused"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "us/step" in out and "us/tensor" in out and "Goals (host overhead):" in out
    goal = [line for line in out.splitlines() if "torch fused <=" in line or "n/a" in line]
    assert goal and all(line.strip().split()[0] in ("PASS", "FAIL", "n/a") for line in goal)
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("1 ", "3 "))]
    assert {(r[0], r[1]) for r in rows} == {(n, b) for n in ("1", "3")
                                            for b in ("reference", "torch_fused")}


def test_host_overhead_bad_arguments():
    for args in (["--host-overhead", "lots"], ["--host-overhead", "--memory-check"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["--device", "cpu", "--smoke"] + args)
        assert info.value.code == 2


def test_host_goal_lines_read_the_rows():
    def row(n, backend, us, ratio):
        return {"n_tensors": n, "backend": backend, "dtype": "float32", "us_per_step": us,
                "vs_torch_fused": ratio, "skipped": None}

    rows = [row(1, "cpu", 20.0, 0.4), row(1, "torch_fused", 50.0, 1.0),
            row(100, "cpu", 30.0, 0.1), row(1000, "cpu", 600.0, 0.3),
            row(5000, "cpu+graph", 1.0, 0.01), row(5000, "reference", 1e5, 9.0)]
    lines = goals.host_goal_lines(rows)
    assert lines == [
        "PASS  cpu / torch fused <= 0.5 at 1 tensor (float32): 0.400 (20.0 vs 50.0 us/step)",
        "FAIL  cpu / torch fused <= 0.2 at 1,000 tensors (float32): 0.300 "
        "(600.0 vs 2000.0 us/step)",
    ]
    assert goals.host_goal_lines([])[0].startswith("n/a")


def test_a_failed_graph_capture_is_a_row_not_a_crash():
    """On the CPU the capture fails (no CUDA stream): the row says why."""
    dev = torch.device("cpu")
    case = cases.Case("host", "host_2", [(1,), (1,)])
    params = host_overhead.make_set(case, torch.float32, dev, host_overhead.Filler(dev, 0))
    c = contenders.adaml_contender("reference")
    env = host_overhead.environment(dev)
    row = host_overhead._graph_row(c, case, torch.float32, params, [p.grad for p in params],
                                   timing.Timer(dev), host_overhead.host_policy(False, True), env)
    assert row["backend"] == "reference+graph" and row["us_per_step"] is None
    assert row["skipped"].startswith("CUDA graph capture or replay failed: ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_overhead_on_cuda_reports_the_graph_rows(tmp_path):
    path = tmp_path / "host_cuda.json"
    assert cli.main(["--device", "cuda", "--smoke", "--host-overhead", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    graph = [r for r in rows if r["backend"].endswith("+graph")]
    assert graph  # measured, or skipped with the capture's failure as the reason
    for r in graph:
        assert r["grads"] == "fixed (CUDA graph)"
        assert r["skipped"] or r["us_per_step"] > 0


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The FSDP2 case on 2 gloo ranks (spawned by the bench itself), smoke sizes."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("fsdp") / "fsdp.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(SMOKE + ["--fsdp", "--json", str(path)])
    return rc, json.loads(path.read_text()), out.getvalue()


def test_fsdp_case_rows(fsdp_run):
    rc, rows, _ = fsdp_run
    assert rc == 0
    fused_adaml = {"cpu"} & set(available_backends("cpu"))
    names = {r["backend"] for r in _measured(rows)}
    assert ({"torch_fused", "torch_foreach"} | fused_adaml
            | {b + fsdp.LOCAL_LOSS for b in fused_adaml}) <= names, names
    assert "reference" not in names  # not fused: only when asked for
    for r in rows:
        for key in fsdp.FSDP_KEYS + REQUIRED_KEYS:
            assert key in r, key
    for r in _measured(rows):
        assert r["kind"] == "fsdp" and r["ranks"] == 2 and r["dist_backend"] == "gloo"
        assert 2 * r["local_params"] == r["n_params"] and r["reps"] == 5
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert isinstance(r["vs_torch_fused"], float) and r["vs_torch_fused"] > 0
        if r["backend"] == "torch_fused":
            assert r["vs_torch_fused"] == pytest.approx(1.0)


def test_fsdp_case_prints_the_table_and_the_ratio(fsdp_run):
    _, _, out = fsdp_run
    assert "adaml-bench FSDP2: 2 gloo ranks" in out and "median ms" in out
    if "cpu" in available_backends("cpu"):
        assert "AdamL cpu / torch fused Adam (float32): " in out


def test_fsdp_case_on_one_rank(tmp_path):
    path = tmp_path / "one.json"
    args = SMOKE + ["--fsdp", "1", "--backends", "torch_fused", "--json", str(path)]
    assert cli.main(args) == 0
    rows = json.loads(path.read_text())
    assert [(r["backend"], r["ranks"]) for r in _measured(rows)] == [("torch_fused", 1)]


def test_fsdp_bad_arguments():
    for args in (["--fsdp", "--host-overhead"], ["--fsdp", "--memory-check"],
                 ["--fsdp", "-1"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["--device", "cpu", "--smoke"] + args)
        assert info.value.code == 2
