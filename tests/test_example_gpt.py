"""examples/train_gpt.py on the CPU: the loss falls, and a run saved at step K and resumed to N
ends bitwise where the uninterrupted N-step run ends (losses and every parameter), in one
process (DCP without a process group), under FSDP2 and under tensor parallelism on 2 gloo ranks.
With --gradient-release (one process): the same, and the run ends bitwise where the ordinary
step without clipping (--clip 0) ends; clipping is refused with it.

The 2-rank runs call the example's main() on ranks started by tests/ranks.py (one start for all
of them); the one-process runs go through the command line, once compiled. Tiny model: d_model
32, 2 layers, sequences of 32 bytes, global batch 8.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from ranks import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_gpt.py")
TINY = ["--device", "cpu", "--d-model", "32", "--layers", "2", "--seq-len", "32",
        "--batch-size", "8", "--no-compile", "--no-bar", "--log-every", "1000"]
N, K = 6, 3  # uninterrupted N steps; K steps, save, resume to N
# Gradient release with buckets of about 20 kB of gradient: the tiny model's 160 kB are
# several buckets, each launched from its own hook during backward.
RELEASE = ["--gradient-release", "--bucket-cap-mb", "0.02"]
TELEMETRY = ["--telemetry", "--log-every", "2"]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def _main(argv):
    sys.path.insert(0, os.path.dirname(EXAMPLE))
    import train_gpt

    return train_gpt.main(argv)


def _split_runs(out, tag, extra):
    """The uninterrupted run, the K-step run that saves, and the resumed one; JSON summaries."""
    ckpt = os.path.join(out, f"ckpt-{tag}")
    _main(TINY + extra + ["--steps", str(N), "--out", os.path.join(out, f"{tag}-full.json")])
    _main(TINY + extra + ["--steps", str(K), "--ckpt", ckpt,
                          "--out", os.path.join(out, f"{tag}-part.json")])
    _main(TINY + extra + ["--steps", str(N), "--ckpt", ckpt, "--resume",
                          "--out", os.path.join(out, f"{tag}-resumed.json")])


def _read(out, tag):
    return {part: json.load(open(os.path.join(out, f"{tag}-{part}.json")))
            for part in ("full", "part", "resumed")}


def worker(rank, world, out):
    _split_runs(out, "fsdp", ["--fsdp"])
    _main(TINY + ["--fsdp"] + TELEMETRY + ["--steps", str(N),
                                           "--out", os.path.join(out, "fsdp-telemetry.json")])
    _split_runs(out, "tp", ["--tp"])  # 2 ranks: a (dp=1, tp=2) mesh


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpt2ranks"))
    run_ranks(worker, 2, out)
    return out


def _cli(args, out, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, EXAMPLE, *args, "--out", out], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.load(open(out)), r.stdout


def _assert_resumes_bitwise(runs):
    full, part, resumed = runs["full"], runs["part"], runs["resumed"]
    assert list(full["losses"]) == [str(k) for k in range(1, N + 1)]
    assert part["losses"] == {k: v for k, v in full["losses"].items() if int(k) <= K}
    assert resumed["steps"] == [K, N]
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if int(k) > K}
    assert resumed["params_sha256"] == full["params_sha256"]
    assert part["params_sha256"] != full["params_sha256"]


def _assert_loss_falls(summary, by=0.2):
    losses = list(summary["losses"].values())
    assert losses[-1] < losses[0] - by, losses
    assert summary["tokens_per_s"] > 0 and 0 < summary["opt_share"] < 1


def test_one_process_command_line_loss_falls(tmp_path):
    # With the progress bar where tqdm is installed (it is an optional dependency: .[bench]).
    bar = importlib.util.find_spec("tqdm") is not None
    args = [a for a in TINY if a != "--no-bar" or not bar] + ["--steps", "10"]
    summary, stdout = _cli(args, str(tmp_path / "one.json"))
    _assert_loss_falls(summary, by=1.0)
    assert summary["world"] == 1 and summary["mesh"] is None and summary["amp_bf16"]
    assert "tokens/s" in stdout and "opt.step" in stdout


def test_one_process_resume_is_bitwise(tmp_path):
    _split_runs(str(tmp_path), "one", [])
    runs = _read(str(tmp_path), "one")
    _assert_resumes_bitwise(runs)
    assert sorted(os.listdir(tmp_path / "ckpt-one")) == ["step-0000003", "step-0000006"]


def test_fsdp_two_ranks_loss_falls_and_resumes_bitwise(two_ranks, tmp_path):
    runs = _read(two_ranks, "fsdp")
    assert runs["full"]["mesh"] == {"dp": 2, "tp": 1} and runs["full"]["world"] == 2
    _assert_loss_falls(runs["full"])
    _assert_resumes_bitwise(runs)
    # Same initial weights and global batch as one process: the same first loss, up to the
    # order of the reductions.
    _main(TINY + ["--steps", "1", "--out", str(tmp_path / "one.json")])
    one = json.load(open(tmp_path / "one.json"))
    assert one["losses"]["1"] == pytest.approx(runs["full"]["losses"]["1"], rel=1e-5)


def test_tensor_parallel_two_ranks_loss_falls_and_resumes_bitwise(two_ranks):
    runs = _read(two_ranks, "tp")
    assert runs["full"]["mesh"] == {"dp": 1, "tp": 2}
    _assert_loss_falls(runs["full"])
    _assert_resumes_bitwise(runs)


def test_compiled_one_process(tmp_path):
    """torch.compile's path, 3 steps (most of this test's time is compilation)."""
    args = [a for a in TINY if a != "--no-compile"] + ["--steps", "3"]
    summary, _ = _cli(args, str(tmp_path / "compiled.json"), timeout=600)
    assert summary["compiled"]
    losses = list(summary["losses"].values())
    assert losses[-1] < losses[0]


def test_one_process_gradient_release_loss_falls_and_resumes_bitwise(tmp_path):
    _split_runs(str(tmp_path), "release", RELEASE)
    runs = _read(str(tmp_path), "release")
    full = runs["full"]
    assert full["gradient_release"] and full["bucket_cap_mb"] == 0.02 and full["clip"] == 0
    _assert_loss_falls(full)
    _assert_resumes_bitwise(runs)


def test_one_process_gradient_release_equals_the_ordinary_step_without_clipping(tmp_path):
    """The release path is specified bitwise equal to the ordinary step (SPEC.md, Gradient
    release); clipping (the ordinary default, --clip 1.0) changes the run: the negative control."""
    runs = {}
    for tag, extra in (("release", RELEASE), ("plain", ["--clip", "0"]), ("clipped", [])):
        _main(TINY + extra + ["--steps", str(N), "--out", str(tmp_path / f"{tag}.json")])
        runs[tag] = json.load(open(tmp_path / f"{tag}.json"))
    assert not runs["plain"]["gradient_release"] and runs["plain"]["clip"] == 0
    assert runs["clipped"]["clip"] == 1.0
    assert runs["release"]["losses"] == runs["plain"]["losses"]
    assert runs["release"]["params_sha256"] == runs["plain"]["params_sha256"]
    assert runs["clipped"]["params_sha256"] != runs["plain"]["params_sha256"]


def _assert_telemetry_logged(run, plain):
    """Figures on the logging steps (2, 4, 6), plausible, and the run bitwise the one without
    telemetry: measuring changes nothing."""
    figures = run["telemetry"]
    assert sorted(figures, key=int) == ["2", "4", "6"]
    for f in figures.values():
        assert 0.0 <= f["sgd_like_fraction"] <= 1.0 and f["update_rms"] > 0.0
        assert f["lost_update_fraction"] == 0.0  # float32 parameters
        assert f["elements"] == run["params"]  # every parameter had a gradient
    assert figures["2"]["update_rms"] != figures["6"]["update_rms"]
    assert run["losses"] == plain["losses"] and run["params_sha256"] == plain["params_sha256"]


def test_one_process_telemetry(tmp_path):
    for tag, extra in (("telemetry", TELEMETRY), ("plain", [])):
        _main(TINY + extra + ["--steps", str(N), "--out", str(tmp_path / f"{tag}.json")])
    runs = {tag: json.load(open(tmp_path / f"{tag}.json")) for tag in ("telemetry", "plain")}
    _assert_telemetry_logged(runs["telemetry"], runs["plain"])
    assert runs["plain"]["telemetry"] is None


def test_fsdp_two_ranks_telemetry(two_ranks):
    """Under FSDP2 the figures are the two shards' combined (telemetry.all_reduce)."""
    run = json.load(open(os.path.join(two_ranks, "fsdp-telemetry.json")))
    _assert_telemetry_logged(run, _read(two_ranks, "fsdp")["full"])


@pytest.mark.parametrize("argv, match", [
    (RELEASE + ["--clip", "1"], "cannot be combined with --gradient-release"),
    (RELEASE + ["--telemetry"], "--telemetry cannot be combined with --gradient-release"),
    (["--bucket-cap-mb", "1"], "needs --gradient-release"),
    (["--clip", "-1"], "must be >= 0"),
])
def test_clipping_and_bucket_size_options_are_checked(argv, match, capsys):
    sys.path.insert(0, os.path.dirname(EXAMPLE))
    import train_gpt

    with pytest.raises(SystemExit) as exit_info:
        train_gpt.parse_args(TINY + argv)
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


def release_worker(rank, world, out):
    _split_runs(out, "fsdp_release", ["--fsdp"] + RELEASE)
    _main(TINY + ["--fsdp", "--clip", "0", "--steps", str(N),
                  "--out", os.path.join(out, "fsdp_plain.json")])


def test_fsdp_two_ranks_gradient_release(tmp_path):
    """FSDP2 with --gradient-release on 2 gloo ranks: the loss falls, a resumed run continues
    bitwise, and the run ends bitwise where the ordinary step without clipping ends."""
    out = str(tmp_path)
    run_ranks(release_worker, 2, out)
    runs = _read(out, "fsdp_release")
    full = runs["full"]
    assert full["mesh"] == {"dp": 2, "tp": 1} and full["gradient_release"] and full["clip"] == 0
    _assert_loss_falls(full)
    _assert_resumes_bitwise(runs)
    plain = json.load(open(os.path.join(out, "fsdp_plain.json")))
    assert not plain["gradient_release"] and plain["mesh"] == full["mesh"]
    assert full["losses"] == plain["losses"]
    assert full["params_sha256"] == plain["params_sha256"]
