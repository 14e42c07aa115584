"""examples/gpt_precision.py, the moment-precision comparison on the GPT example: a tiny run
trains every mode, sizes the state as the modes say, and reports each final loss against fp32's.
"""

from __future__ import annotations

import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import gpt_precision  # noqa: E402

TINY = ["--steps", "8", "--seeds", "2", "--eval-every", "4", "--batch-size", "8",
        "--seq-len", "32", "--d-model", "64", "--layers", "1", "--val-windows", "16"]


def test_every_mode_trains_and_is_compared_with_fp32(tmp_path):
    result = gpt_precision.main(TINY + ["--out", str(tmp_path / "r.json"),
                                        "--plot", str(tmp_path / "r.png")])
    modes = result["modes"]
    assert list(modes) == list(gpt_precision.MODES)
    for name, r in modes.items():
        assert r["steps"] == [4, 8]
        for curve in r["val_loss"]:
            # from about ln(256) = 5.55 at initialization: every mode learns something
            assert all(math.isfinite(v) for v in curve) and curve[-1] < 5.0, (name, curve)
        assert r["vs_fp32"] == r["final_mean_std"][0] / modes["fp32 moments"]["final_mean_std"][0] - 1
    fp32 = modes["fp32 moments"]["state_bytes"]
    assert modes["bf16 moments"]["state_bytes"] == fp32 // 2
    # 8-bit: ~2 B per element of the large tensors, float32 for the small ones (biases, norms)
    assert modes["8-bit moments"]["state_bytes"] < 0.3 * fp32
    # different seeds are different runs
    assert modes["fp32 moments"]["val_loss"][0] != modes["fp32 moments"]["val_loss"][1]
    assert (tmp_path / "r.png").stat().st_size > 0 and (tmp_path / "r.json").stat().st_size > 0
