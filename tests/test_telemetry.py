"""Telemetry (SPEC.md, Telemetry; docs/telemetry.md): every backend's figures of a step against a
float64 evaluation of that same step (tests/oracle.py), started from the backend's own state
before it, so that the figures of each step are checked on their own. Counts must be exact up to
the elements whose outcome float32 arithmetic may decide either way (the oracle counts them);
update_rms within float32 reduction error. Also: telemetry never changes the update, skipped
steps keep the figures, parameters without a gradient are not counted, the fast path measures
too, and checkpoints are unaffected."""

import copy
import math

import numpy as np
import pytest
import torch

import tolerances
from adaml_kernels import AdamL, available_backends, quant8
from adaml_kernels.telemetry import KEYS
from oracle import Hyper, Oracle, ParamState

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in available_backends("cpu")]
GPU_BACKENDS = [b for b in ("cuda", "triton") if torch.cuda.is_available()
                and b in available_backends("cuda")]

MODES = {  # name: (param dtype, AdamL options)
    "fp32": (torch.float32, {}),
    "fp16": (torch.float16, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16-master": (torch.bfloat16, dict(master_weights=True)),
    "bf16-moments": (torch.bfloat16, dict(state_dtype=torch.bfloat16)),
    "8bit": (torch.float32, dict(state_dtype=torch.uint8)),
    "bf16-8bit-sr": (torch.bfloat16, dict(state_dtype=torch.uint8, stochastic_rounding=True,
                                          seed=7)),
}
# Two groups; the last parameter never gets a gradient. 4480 elements: 8-bit moments apply.
SIZES = [[(64, 70), (7,)], [(1023,), (33,)]]
NO_GRAD = (1, 1)
# A mix of SGD-like and adaptive elements: g spans five decades, eps * l ~ 1e-6.
MIXED = dict(lr=1e-2, eps=1e-6, weight_decay=0.01, gamma=1.0, phi=1.0)
# phi = 4 with the loss at f*: l^phi = 1e-48, so (1 - b2) g^2 / (gamma l^phi) passes float32's
# (and bf16's) largest value for |g| above about 6e-4, and w saturates there.
SATURATING = dict(lr=1e-2, eps=1e-8, phi=4.0, loss_offset=1.0)
STORAGE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MOMENTS = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.uint8: "uint8"}


def make(backend, mode, hyper, telemetry=True, seed=0, device="cpu"):
    dtype, options = MODES[mode]
    g = torch.Generator().manual_seed(seed)
    groups = [[torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in sizes]
              for sizes in SIZES]
    opt = AdamL([{"params": ps} for ps in groups], backend=backend, telemetry=telemetry,
                **hyper, **options)
    return [p for ps in groups for p in ps], opt


def grads_for(params, step, skip=()):
    """Gradients spanning several decades (so that both modes occur), None for `skip`."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for j, p in enumerate(params):
        scale = 10.0 ** (-5 * torch.rand(p.shape, generator=g))
        out.append(None if j in skip else
                   (torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype))
    return out


def as_numpy(t):
    return t.detach().cpu().to(torch.float64).numpy().copy()


def moment_values(st, key):
    t = st[key]
    if t.dtype == torch.uint8:
        t = quant8.decode_moment(t, st[quant8.SCALE_KEYS[key]], key)
    return as_numpy(t)


def oracle_before(opt, params, hyper):
    """The oracle, in the optimizer's state before its next step."""
    states = []
    for j, p in enumerate(params):
        st = opt.state.get(p) or {}
        master = st.get("master_param")
        if "exp_avg" not in st:
            moments = "float32"
            if opt.precision.state_dtype is not None:
                from adaml_kernels.buckets import moment_dtype
                moments = MOMENTS[moment_dtype(p.dtype, opt.precision.state_dtype, p.numel())]
            if opt.precision.master_weights and p.dtype in (torch.float16, torch.bfloat16):
                master = p.float()
            states.append(ParamState(as_numpy(p), storage=STORAGE[p.dtype], moments=moments,
                                     master=None if master is None else as_numpy(master),
                                     index=j))
            continue
        states.append(ParamState(
            as_numpy(p), moment_values(st, "exp_avg"), moment_values(st, "exp_avg_sq"),
            k=int(st["step"]), storage=STORAGE[p.dtype], moments=MOMENTS[st["exp_avg"].dtype],
            master=None if master is None else as_numpy(master), index=j))
    f1 = opt.initial_loss
    return Oracle(Hyper(**hyper), states, f1=math.nan if f1 is None else float(f1),
                  stochastic_rounding=opt.precision.stochastic_rounding, seed=opt.precision.seed)


def group_sums(oracle, stepped):
    """Per group: the oracle's figures summed over the parameters stepped."""
    out, j = [], 0
    for sizes in SIZES:
        total = {}
        for _ in sizes:
            if j in stepped:
                for key, value in oracle.params[j].figures.items():
                    total[key] = total.get(key, 0) + value
            j += 1
        out.append(total)
    return out


def assert_matches(figures, expected):
    for f, want in zip(figures, expected):
        n = want["elements"]
        assert int(f["elements"]) == n
        for key, name in (("sgd_like_fraction", "sgd_like"), ("lost_update_fraction", "lost"),
                          ("saturated_fraction", "saturated")):
            count = float(f[key]) * n
            assert abs(count - round(count)) < 1e-6 * n, (key, count)  # a whole count
            assert abs(round(count) - want[name]) <= want[f"ambiguous_{name}"], (
                key, round(count), want[name], want[f"ambiguous_{name}"])
        mean_square = float(f["update_rms"]) ** 2 * n
        slack = tolerances.TELEMETRY_MEAN_SQUARE_RTOL * want["squared_change"] + \
            want["squared_change_slack"]
        assert abs(mean_square - want["squared_change"]) <= slack, (
            mean_square, want["squared_change"], slack)


def run(backend, mode, hyper, steps, losses, twin=True, device="cpu"):
    """`steps` steps checked against the oracle, and (twin) bitwise against telemetry=False."""
    params, opt = make(backend, mode, hyper, device=device)
    twin_params, twin_opt = make(backend, mode, hyper, telemetry=False, device=device) \
        if twin else (None, None)
    sums = []
    for k in range(steps):
        grads = grads_for(params, k, skip={sum(map(len, SIZES[:NO_GRAD[0]])) + NO_GRAD[1]})
        oracle = oracle_before(opt, params, hyper)
        for p, g in zip(params, grads):
            p.grad = g
        loss = losses[k]
        opt.step(torch.tensor(loss, device=device))
        oracle.step([None if g is None else as_numpy(g) for g in grads], loss)
        expected = group_sums(oracle, {j for j, g in enumerate(grads) if g is not None})
        assert_matches(opt.telemetry(), expected)
        sums.append(expected)
        if twin:
            for p, q, g in zip(params, twin_params, grads):
                q.grad = None if g is None else g.clone()
            twin_opt.step(torch.tensor(loss, device=device))
            for p, q in zip(params, twin_params):
                assert torch.equal(p, q)
                for key, value in opt.state[p].items():
                    other = twin_opt.state[q][key]
                    assert torch.equal(value, other) or value.isnan().all() and other.isnan().all()
    return params, opt, sums


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_figures_match_the_float64_oracle(backend, mode):
    steps = 2 if backend == "triton" else 3
    _, opt, sums = run(backend, mode, MIXED, steps, [2.0, 1.5, 0.7])
    total = sums[-1][0]
    assert 0 < total["sgd_like"] < total["elements"]  # both modes occur: the count can fail
    if mode.startswith(("bf16", "fp16")) and "master" not in mode:
        assert total["lost"] > 0


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA GPU (cuda or triton backend)")
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["cuda"])
def test_figures_match_the_float64_oracle_on_gpu(backend, mode):
    """The CUDA kernel's block reductions and the Triton kernel on a GPU: the same figures."""
    _, opt, sums = run(backend, mode, MIXED, 3, [2.0, 1.5, 0.7], device="cuda")
    total = sums[-1][0]
    assert 0 < total["sgd_like"] < total["elements"]
    assert all(f["update_rms"].is_cuda for f in opt.telemetry())


@pytest.mark.parametrize("mode", ["fp32", "bf16-moments", "8bit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_saturation_with_phi_4_at_the_optimum(backend, mode):
    _, opt, sums = run(backend, mode, SATURATING, 2, [1.0, 1.0], twin=False)
    total = sums[-1][0]
    assert 0 < total["saturated"] < total["elements"]
    for f in opt.telemetry():
        assert 0 < float(f["saturated_fraction"]) < 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_keeps_the_figures_of_the_last_step_taken(backend):
    params, opt = make(backend, "bf16", MIXED)
    for k, loss in enumerate([2.0, math.nan, 1.0, math.inf]):
        for p, g in zip(params, grads_for(params, k)):
            p.grad = g
        before = [torch.stack([f[key] for key in KEYS]) for f in opt.telemetry()] if k else None
        opt.step(torch.tensor(loss))  # a device loss: the skip is decided on the device
        after = [torch.stack([f[key] for key in KEYS]) for f in opt.telemetry()]
        if math.isfinite(loss):
            assert not torch.equal(after[0], before[0]) if before else True
        else:
            assert all(torch.equal(a, b) for a, b in zip(after, before))
    opt.step(float("nan"))  # a host number: skipped before any launch
    assert all(torch.equal(a, b) for a, b in zip(
        [torch.stack([f[key] for key in KEYS]) for f in opt.telemetry()], after))
    # what telemetry() returned stays as it was, whatever the later steps
    kept = opt.telemetry()
    values = [torch.stack([f[key] for key in KEYS]) for f in kept]
    for p, g in zip(params, grads_for(params, 9)):
        p.grad = g
    opt.step(torch.tensor(0.5))
    assert not torch.equal(torch.stack([opt.telemetry()[0][key] for key in KEYS]), values[0])
    assert all(torch.equal(torch.stack([f[key] for key in KEYS]), v)
               for f, v in zip(kept, values))


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_without_a_gradient_are_not_counted(backend):
    hyper = MIXED
    params, opt = make(backend, "fp32", hyper)
    for k, skip in enumerate([{1}, set(), {0, 1}]):
        grads = grads_for(params, k, skip=skip | {3})
        oracle = oracle_before(opt, params, hyper)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step(torch.tensor(1.5))
        oracle.step([None if g is None else as_numpy(g) for g in grads], 1.5)
        stepped = {j for j, g in enumerate(grads) if g is not None}
        expected = group_sums(oracle, stepped)
        figures = opt.telemetry()
        if not stepped & {0, 1}:  # group 0 updated nothing this step
            assert int(figures[0]["elements"]) == 0 and figures[0]["update_rms"].isnan()
            assert_matches(figures[1:], expected[1:])
        else:
            assert_matches(figures, expected)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the fast path needs the cpu backend")
def test_the_fast_path_measures(monkeypatch):
    general = AdamL._general_step
    calls = []
    monkeypatch.setattr(AdamL, "_general_step",
                        lambda self, *a, **k: calls.append(1) or general(self, *a, **k))
    params, opt = make("cpu", "bf16", MIXED)
    for k, loss in enumerate([2.0, 1.5, 1.2, 0.9]):
        grads = grads_for(params, k, skip={3})
        oracle = oracle_before(opt, params, MIXED)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step(torch.tensor(loss))
        oracle.step([None if g is None else as_numpy(g) for g in grads], loss)
        assert_matches(opt.telemetry(), group_sums(oracle, {0, 1, 2}))
        assert opt.engine.fast is not None and opt.engine.fast.launch_args[-1]
    assert len(calls) == 1  # only the first step took the general path


def test_figures_are_nan_before_the_first_step_and_need_the_option():
    params, opt = make("reference", "fp32", MIXED)
    assert all(f["update_rms"].isnan() and int(f["elements"]) == 0 for f in opt.telemetry())
    _, plain = make("reference", "fp32", MIXED, telemetry=False)
    with pytest.raises(RuntimeError, match="telemetry=True"):
        plain.telemetry()
    with pytest.raises(ValueError, match="telemetry"):
        AdamL(params, telemetry=1)
    with pytest.raises(ValueError, match="gradient_release"):
        AdamL(params, telemetry=True, gradient_release=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_are_the_same_with_telemetry(backend):
    params, opt = make(backend, "bf16-master", MIXED)
    twin_params, twin = make(backend, "bf16-master", MIXED, telemetry=False)
    for k in range(2):
        for ps, o in ((params, opt), (twin_params, twin)):
            for p, g in zip(ps, grads_for(ps, k, skip={3})):
                p.grad = g
            o.step(torch.tensor(1.0 + k))
    saved, twin_saved = opt.state_dict(), twin.state_dict()
    assert saved["param_groups"] == twin_saved["param_groups"]
    for i, st in saved["state"].items():
        assert st.keys() == twin_saved["state"][i].keys()
        for key, value in st.items():
            other = twin_saved["state"][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else \
                value == other or (math.isnan(value) and math.isnan(other))
    # load into a new telemetry optimizer, and a copy of this one: both measure on
    restored_params = [p.detach().clone().requires_grad_() for p in params]
    restored = AdamL([{"params": restored_params[:2]}, {"params": restored_params[2:]}],
                     backend=backend, telemetry=True, **MIXED, **MODES["bf16-master"][1])
    restored.load_state_dict(copy.deepcopy(saved))
    assert all(f["update_rms"].isnan() for f in restored.telemetry())
    copied = copy.deepcopy(opt)
    assert copied.engine.telemetry is not None
    for ps, o in ((params, opt), (restored_params, restored)):
        grads = grads_for(ps, 5, skip={3})
        oracle = oracle_before(o, ps, MIXED)
        for p, g in zip(ps, grads):
            p.grad = g
        o.step(torch.tensor(0.8))
        oracle.step([None if g is None else as_numpy(g) for g in grads], 0.8)
        assert_matches(o.telemetry(), group_sums(oracle, {0, 1, 2}))
    for a, b in zip(opt.telemetry(), restored.telemetry()):
        assert all(torch.equal(a[key], b[key]) for key in KEYS)
    opt.load_state_dict(opt.state_dict())  # keeps the figures measured so far
    assert not np.isnan(float(opt.telemetry()[0]["update_rms"]))


def test_the_comparison_rejects_a_count_or_an_rms_that_is_off():
    # negative control of assert_matches: one element more, or 1% more update_rms, fails
    _, opt, sums = run("reference", "fp32", MIXED, 1, [2.0], twin=False)
    assert sums[-1][0]["ambiguous_sgd_like"] == 0 and sums[-1][0]["squared_change_slack"] == 0
    good = opt.telemetry()
    assert_matches(good, sums[-1])
    n = sums[-1][0]["elements"]
    for key, delta in (("sgd_like_fraction", 1.0 / n), ("update_rms", 0.01 * float(
            good[0]["update_rms"]))):
        bad = [dict(f) for f in good]
        bad[0][key] = bad[0][key] + delta
        with pytest.raises(AssertionError):
            assert_matches(bad, sums[-1])


@pytest.mark.parametrize("op", ["fused_step_", "triton_step_"])
def test_opcheck_with_telemetry(op):
    from adaml_kernels import backends
    from adaml_kernels.buckets import Bucket
    from adaml_kernels.hyperparams import Hyperparams
    from adaml_kernels.loss import StepInputs

    name = "cpu" if op == "fused_step_" else "triton"
    if name not in BACKENDS:
        pytest.skip(backends.unavailable_reason(name, "cpu"))
    backends.step_function(name)  # imports the module that registers the op
    torch.manual_seed(0)
    sizes = (5, 2049)
    params = [torch.randn(k).bfloat16() for k in sizes]
    bucket = Bucket(params, [torch.randn(k).bfloat16() for k in sizes],
                    [torch.randn(k) for k in sizes], [torch.rand(k) for k in sizes],
                    [torch.tensor(3.0) for _ in sizes], master_params=[p.float() for p in params],
                    stochastic_rounding=True, seed=3, telemetry=True)
    hp = Hyperparams(lr=0.01, weight_decay=0.1, normalize_loss=True)
    inputs = StepInputs(torch.tensor(1.5), torch.tensor(1.0), torch.tensor(2.0),
                        torch.tensor(2.0, dtype=torch.float64))
    args = bucket.fused_op_args(hp, inputs)
    torch.library.opcheck(getattr(torch.ops.adaml_kernels, op).default, args)
    getattr(torch.ops.adaml_kernels, op)(*args)
    assert bucket.telemetry.shape == (3, len(KEYS) - 1)
    assert bucket.telemetry[:, 1].gt(0).all()  # every chunk wrote its squared change
    with pytest.raises((RuntimeError, ValueError), match="telemetry"):
        getattr(torch.ops.adaml_kernels, op)(*args[:-1], bucket.telemetry[:2])


# ------------------------------------------------------------------ data parallel (2 gloo ranks)

def _data_parallel_worker(rank, world, out_dir):
    """DDP and FSDP2 on the cpu backend: each rank's figures, and telemetry.all_reduce's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from adaml_kernels.telemetry import all_reduce

    results = {}
    for kind in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(),
                                    torch.nn.Linear(33, 5))
        if kind == "fsdp":
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            wrapped = model
        else:
            wrapped = DistributedDataParallel(model)
        opt = AdamL(model.parameters(), lr=1e-2, eps=1e-4, backend="cpu", telemetry=True)
        g = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x = torch.randn(8, 16, generator=g)
            loss = wrapped(x).pow(2).mean()
            loss.backward()
            opt.step(loss.detach())
            opt.zero_grad()
        local = {key: float(v) for key, v in opt.telemetry()[0].items()}
        combined = {key: float(v) for key, v in all_reduce(opt.telemetry())[0].items()}
        results[kind] = (local, combined)
    torch.save(results, f"{out_dir}/telemetry_rank{rank}.pt")


def test_data_parallel_figures_and_their_all_reduce(tmp_path):
    from ranks import run_ranks

    if "cpu" not in BACKENDS:
        pytest.skip("needs adaml_kernels._C")
    run_ranks(_data_parallel_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"telemetry_rank{r}.pt") for r in range(2)]
    numel = 16 * 33 + 33 + 33 * 5 + 5
    # DDP: replicas step alike, so every rank measures the same (the all-reduce, which counts
    # every replica's elements, gives the same fractions)
    ddp = [r["ddp"] for r in results]
    assert ddp[0][0] == ddp[1][0] and ddp[0][0]["elements"] == numel
    assert ddp[0][1]["elements"] == 2 * numel
    for key in KEYS[:-1]:
        assert ddp[0][1][key] == pytest.approx(ddp[0][0][key], rel=1e-12)
    # FSDP2: each rank measures its shard; the all-reduce weighs them by their elements
    local = [r["fsdp"][0] for r in results]
    assert local[0]["elements"] + local[1]["elements"] == numel
    assert 0 < local[0]["update_rms"] and 0 < local[1]["update_rms"]
    n = [f["elements"] for f in local]
    for key in ("sgd_like_fraction", "lost_update_fraction", "saturated_fraction"):
        want = (local[0][key] * n[0] + local[1][key] * n[1]) / numel
        assert results[0]["fsdp"][1][key] == pytest.approx(want, rel=1e-12, abs=1e-15)
    rms = math.sqrt((local[0]["update_rms"] ** 2 * n[0] + local[1]["update_rms"] ** 2 * n[1])
                    / numel)
    assert results[0]["fsdp"][1]["update_rms"] == pytest.approx(rms, rel=1e-12)
    assert results[0]["fsdp"][1] == results[1]["fsdp"][1]
