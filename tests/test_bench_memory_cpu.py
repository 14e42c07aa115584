"""The CPU memory benchmark (adaml-bench --memory-cpu), end to end on a tiny model.

No memory or timing threshold is asserted: only that every scenario and optimizer has a row
with finite numbers.
"""

import json
import math
import sys

import pytest

from adaml_kernels.bench import cli, memory_cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/status")


def test_memory_cpu_cli_end_to_end(tmp_path, capsys):
    path = tmp_path / "memory_cpu.json"
    assert cli.main(["--memory-cpu", "--mem-size", "2x256", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    optimizers, _ = memory_cpu.choose_optimizers()
    assert "torch_fused" in optimizers and "reference" in optimizers
    assert "baseline: VmRSS after building the model" in out

    table = [line.split() for line in out.splitlines()]
    printed = {(t[0], t[1]): t for t in table if len(t) >= 2 and t[0] in memory_cpu.ROWS}
    rows = json.loads(path.read_text())
    assert len(rows) == len(memory_cpu.ROWS) * len(optimizers)
    for scenario in memory_cpu.ROWS:
        for opt in optimizers:
            assert (scenario, opt) in printed, (scenario, opt)
            assert math.isfinite(float(printed[scenario, opt][2]))
            row = next(r for r in rows if r["scenario"] == scenario and r["optimizer"] == opt)
            assert row["skipped"] is None, row
            assert math.isfinite(row["value_mb"]) and isinstance(row["value_bytes"], int)
            assert row["raw"]["baseline"] > 0 and row["raw"]["param_bytes"] == 4 * 2 * (
                256 * 256 + 256)
            if row["vs_torch_fused"] is not None:
                assert math.isfinite(row["vs_torch_fused"])
                if opt == "torch_fused":
                    assert row["vs_torch_fused"] == pytest.approx(1.0)


def test_mem_size_is_checked(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--memory-cpu", "--mem-size", "lots"])
    assert "LAYERSxWIDTH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--memory-cpu", "--memory-check"])
    assert memory_cpu.parse_mem_size("24x2048") == (24, 2048)
