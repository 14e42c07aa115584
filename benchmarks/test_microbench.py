"""pytest-benchmark microbenchmarks of one optimizer step. Not part of the default test run
(pyproject's testpaths is tests/); run them explicitly:

    pytest benchmarks/                              # CPU, and CUDA when there is a GPU
    pytest benchmarks/ --benchmark-group-by=param:case --benchmark-columns=median,iqr,ops

Each benchmark times the full ``opt.step`` of one optimizer (every available AdamL backend,
torch.optim.Adam fused and foreach) on a small workload, cycling through independent parameter
sets so the caches do not hold the previous step's data; a copy of the same traffic is the
baseline. The bytes moved under adaml-bench's traffic model go into extra_info. For the full
comparison (sizes up to 1B, GB/s, % of copy), use ``adaml-bench``.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from adaml_kernels.bench import cases, contenders, params  # noqa: E402

CASES = {
    "1M": [(1 << 20,)],  # one tensor
    "gpt2_tiny": cases.gpt2_small_shapes(n_layer=2, d=128, vocab=2048, ctx=256),
    "small_x500": cases.many_small_shapes(500),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETS = 3


def _contenders():
    out = []
    for dev in DEVICES:
        found, _notes = contenders.contenders_for(torch.device(dev))
        out += [pytest.param(dev, c.name, id=f"{dev}-{c.name}") for c in found]
    return out


def _timed(device: str, fn):
    if device == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        return run
    return fn


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device,name", _contenders())
def test_step(benchmark, device, name, case):
    dev = torch.device(device)
    contender = next(c for c in contenders.contenders_for(dev)[0] if c.name == name)
    shapes = CASES[case]
    if name == "reference" and len(shapes) > 1:
        pytest.skip("the reference backend steps one tensor at a time: too slow for lists")
    workload = cases.Case("sweep" if len(shapes) == 1 else "list", case, shapes)
    filler = params.Filler(dev, 0)
    sets = [params.make_set(workload, torch.float32, dev, filler) for _ in range(SETS)]
    opts = [contender.make(ps) for ps in sets]
    loss = torch.tensor(2.0, device=dev)
    for opt in opts:  # warm-up: state, tables, kernels
        contender.step(opt, loss)
    turn = [0]

    def step():
        contender.step(opts[turn[0] % SETS], loss)
        turn[0] += 1

    bpp = contender.bytes_per_param(torch.float32)
    benchmark.extra_info.update(
        backend=name, n_params=workload.n_params, n_tensors=workload.n_tensors,
        bytes_per_param=bpp, bytes_moved=bpp * workload.n_params,
    )
    rounds = 100 if device == "cuda" else (3 if name == "reference" else 10)
    benchmark.pedantic(_timed(device, step), rounds=rounds, warmup_rounds=SETS)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_copy_baseline(benchmark, device, case):
    """dst.copy_(src) moving the same bytes as an fp32 AdamL step (28 B/param, read + write)."""
    n = cases.Case("list", case, CASES[case]).n_params * 28 // 8  # float32 elements per buffer
    srcs = [torch.ones(n, device=device) for _ in range(SETS)]
    dsts = [torch.empty(n, device=device) for _ in range(SETS)]
    turn = [0]

    def copy():
        i = turn[0] % SETS
        dsts[i].copy_(srcs[i])
        turn[0] += 1

    benchmark.extra_info.update(backend="copy", bytes_moved=8 * n)
    benchmark.pedantic(_timed(device, copy), rounds=100 if device == "cuda" else 10,
                       warmup_rounds=SETS)
