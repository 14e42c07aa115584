"""The low-precision modes as torch.optim options: bf16 weights that keep learning, skipped steps,
checkpoints (AdamL and torch.optim.Adam), validation, gradient dtypes, state memory."""

import io
import math

import pytest
import torch

from adaml_kernels import AdamL
from parity import cpu_testable_backends

BACKENDS = cpu_testable_backends()
BF16 = torch.bfloat16

MODES = {
    "plain": {},
    "sr": dict(stochastic_rounding=True, seed=7),
    "master": dict(master_weights=True),
    "bf16_state": dict(state_dtype=BF16),
    "bf16_state_sr": dict(state_dtype=BF16, stochastic_rounding=True, seed=8),
    "everything": dict(stochastic_rounding=True, master_weights=True, state_dtype=BF16,
                       seed=2**64 - 3),
}


def _walk(backend, device, dtype, steps=100, n=4096, **options):
    """n parameters at 1.0, lr 1e-3, gradient 1 every step: Adam's step is about lr, so fp32
    moves to about 1 - steps * lr."""
    p = torch.ones(n, device=device, dtype=dtype, requires_grad=True)
    opt = AdamL([p], lr=1e-3, backend=backend, **options)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step(1.0)
    return p.detach().cpu().float(), opt


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_weights_keep_learning_with_stochastic_rounding_or_master_weights(backend, device):
    # The check: a bf16 parameter at 1.0, lr 1e-3, 100 steps.
    n = 1024 if backend == "triton" and device == "cpu" else 4096
    fp32, _ = _walk(backend, device, torch.float32, n=n)
    assert 0.89 < float(fp32[0]) < 0.91
    stuck, _ = _walk(backend, device, BF16, n=n)  # round to nearest: each update < half an ulp
    assert torch.all(stuck == 1.0)
    sr, _ = _walk(backend, device, BF16, n=n, stochastic_rounding=True)
    # Each element is the fp32 path plus 100 independent rounding errors of mean 0 and standard
    # deviation <= 2^-8 / 2: it ends within ~0.02 (one sd) of it, and the mean of n elements
    # within 0.02 / sqrt(n) (2e-3 is over 6 sd).
    assert abs(float(sr.mean()) - float(fp32[0])) < 2e-3
    assert float(sr.std()) < 0.03
    assert float((sr < 0.99).float().mean()) > 0.99
    master, opt = _walk(backend, device, BF16, n=n, master_weights=True)
    # The master weight follows fp32 exactly; the parameter is its rounding to nearest.
    x = next(iter(opt.state.values()))["master_param"].cpu()
    assert torch.equal(x, fp32)
    assert torch.equal(master, fp32.to(BF16).float())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_skipped_step_changes_nothing_in_any_mode(backend, device, mode):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device, BF16).requires_grad_() for s in (7, 2049)]
    opt = AdamL(params, lr=0.01, backend=backend, **MODES[mode])
    for loss in (2.0, 1.5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device, BF16)
        opt.step(loss)
    before = ([p.detach().clone() for p in params],
              [{k: v.clone() for k, v in opt.state[p].items()} for p in params])
    for bad in (math.nan, torch.tensor(math.inf, device=device)):
        opt.step(bad)
    for p, b in zip(params, before[0]):
        assert torch.equal(p.detach().view(torch.int16), b.view(torch.int16))
    for p, b in zip(params, before[1]):
        assert opt.state[p].keys() == b.keys()
        for k, v in b.items():
            if k == "skipped_steps":  # counts the skips: checked below
                continue
            got = opt.state[p][k]
            assert torch.equal(got, v) or (got.isnan().all() and v.isnan().all()), k
    assert opt.skipped_steps == 2


def _train(opt, params, seeds, device):
    for s in seeds:
        gen = torch.Generator().manual_seed(s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device, p.grad_dtype or p.dtype)
        if isinstance(opt, AdamL):
            opt.step(1.0 + 0.1 * s)
        else:
            opt.step()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_checkpoint_round_trip_resumes_bitwise_in_every_mode(backend, device, mode):
    def make(seed_override=None):
        gen = torch.Generator().manual_seed(1)
        params = [torch.randn(s, generator=gen).to(device, BF16).requires_grad_()
                  for s in ((5, 3), (2049,))]
        options = dict(MODES[mode])
        if seed_override is not None and "seed" in options:
            options["seed"] = seed_override  # the checkpoint's seed must win
        return params, AdamL(params, lr=0.01, backend=backend, **options)

    params, opt = make()
    _train(opt, params, range(3), device)
    buffer = io.BytesIO()
    torch.save({"model": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    _train(opt, params, range(3, 6), device)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, opt2 = make(seed_override=12345)
    with torch.no_grad():
        for p, v in zip(resumed, saved["model"]):
            p.copy_(v)
    opt2.load_state_dict(saved["opt"])
    _train(opt2, resumed, range(3, 6), device)
    for p, q in zip(params, resumed):
        assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k
            assert v.dtype == opt2.state[q][k].dtype


def test_state_dict_keys_and_dtypes_per_mode():
    p16 = torch.zeros(4, dtype=BF16, requires_grad=True)
    p32 = torch.zeros(3, requires_grad=True)
    opt = AdamL([p16, p32], **MODES["everything"])
    _train(opt, [p16, p32], [0], "cpu")
    sd = opt.state_dict()
    assert sd["state"][0]["master_param"].dtype == torch.float32
    assert "master_param" not in sd["state"][1]  # float32 parameters need none
    for i in (0, 1):
        assert sd["state"][i]["exp_avg"].dtype == BF16
        assert sd["state"][i]["exp_avg_sq"].dtype == BF16
    assert sd["adaml"]["seed"] == 2**64 - 3
    assert "seed" not in AdamL([p32]).state_dict().get("adaml", {})  # no rounding, no seed


def test_adam_and_adaml_checkpoints_load_both_ways_with_master_weights():
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).to(BF16).requires_grad_() for s in ((4, 3), (9,))]
    opt = AdamL(params, lr=0.01, master_weights=True, state_dtype=BF16)
    _train(opt, params, range(3), "cpu")

    # AdamL -> torch.optim.Adam: moments load (in Adam's dtype, the parameters'), the master
    # weight travels along as an extra entry (torch casts every float state to bf16)
    adam = torch.optim.Adam(params, lr=0.01)
    adam.load_state_dict(opt.state_dict())
    adam.step()
    assert adam.state[params[0]]["exp_avg"].dtype == BF16
    # torch.optim.Adam -> AdamL: moments become AdamL's; what Adam kept of the master weight
    # (its bf16 cast of the saved one, never updated) no longer rounds to the parameter Adam
    # trained, so the parameter wins
    assert not torch.equal(adam.state[params[0]]["master_param"], params[0].detach())
    back = AdamL(params, lr=0.01, master_weights=True)
    back.load_state_dict(adam.state_dict())
    for p in params:
        assert torch.equal(back.state[p]["master_param"], p.detach().float())
    _train(back, params, [3], "cpu")
    for p in params:
        st = back.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["master_param"].dtype == torch.float32
        assert float(st["step"]) == 5.0
    # an Adam checkpoint without master weights: AdamL starts them from the parameters
    fresh = [p.detach().clone().requires_grad_() for p in params]
    plain = torch.optim.Adam(fresh, lr=0.01)
    _train(plain, fresh, [0], "cpu")
    warm = AdamL(fresh, lr=0.01, master_weights=True)
    warm.load_state_dict(plain.state_dict())
    values = [p.detach().float().clone() for p in fresh]
    warm.step(float("nan"))  # skipped: nothing changes, not even masters
    _train(warm, fresh, [1], "cpu")
    for p, v in zip(fresh, values):
        assert warm.state[p]["master_param"].dtype == torch.float32
        assert not torch.equal(warm.state[p]["master_param"], v)  # stepped from p's value


def test_bf16_moments_halve_the_state():
    params = [torch.zeros(1 << 16, requires_grad=True)]
    sizes = {}
    for dtype in (None, BF16):
        opt = AdamL(params, state_dtype=dtype)
        _train(opt, params, [0], "cpu")
        st = opt.state[params[0]]
        buffer = st["exp_avg"].untyped_storage()
        assert buffer.data_ptr() == st["exp_avg_sq"].untyped_storage().data_ptr()  # one buffer
        sizes[dtype] = buffer.nbytes()
    assert sizes[BF16] < 0.51 * sizes[None]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float32_gradients_for_bf16_parameters_are_read_as_float32(backend, device):
    # Megatron-style main grads: torch accepts them once p.grad_dtype is set. The update reads
    # the float32 values, not their bf16 rounding.
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(3000, generator=gen) * 1e-3 + 1.0
    fine = torch.randn(3000, generator=gen).to(BF16).to(device).requires_grad_()
    coarse = fine.detach().clone().requires_grad_()
    fine.grad_dtype = torch.float32
    fine.grad = g.to(device)
    coarse.grad = g.to(BF16).to(device)
    opts = [AdamL([p], lr=0.1, backend=backend, master_weights=True) for p in (fine, coarse)]
    for opt in opts:
        opt.step(1.0)
    m_fine = opts[0].state[fine]["exp_avg"].cpu()
    m_coarse = opts[1].state[coarse]["exp_avg"].cpu()
    torch.testing.assert_close(m_fine, 0.1 * g, rtol=1e-6, atol=0)
    assert not torch.equal(m_fine, m_coarse)
    bucket = opts[0].describe()[0][0]
    assert (bucket["grad_dtype"], bucket["master_weights"]) == ("float32", True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradients_switching_dtype_between_steps_make_a_new_plan(backend, device):
    p = torch.ones(100, dtype=BF16, device=device, requires_grad=True)
    opt = AdamL([p], lr=0.01, backend=backend)
    p.grad = torch.ones_like(p)
    opt.step(1.0)
    p.grad = None
    p.grad_dtype = torch.float32
    p.grad = torch.ones(100, device=device)
    opt.step(1.0)
    assert float(opt.state[p]["step"]) == 2.0
    assert torch.all(p != 1.0)


def test_gradients_of_another_dtype_are_refused_clearly():
    p = torch.zeros(3, dtype=BF16, requires_grad=True)
    p.grad_dtype = None  # torch then accepts any gradient dtype
    p.grad = torch.zeros(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="or be float32 for a float16/bfloat16 parameter"):
        AdamL([p]).step(1.0)
    q = torch.zeros(3, requires_grad=True)
    q.grad_dtype = None
    q.grad = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="gradient does not match its parameter"):
        AdamL([q]).step(1.0)


@pytest.mark.parametrize("name,kwargs", [
    ("stochastic_rounding", dict(stochastic_rounding=1)),
    ("master_weights", dict(master_weights="yes")),
    ("state_dtype", dict(state_dtype=torch.float16)),
    ("state_dtype", dict(state_dtype="bfloat16")),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=2**64)),
    ("seed", dict(seed=1.5)),
    ("seed", dict(seed=True)),
])
def test_invalid_precision_options_raise_naming_them(name, kwargs):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        AdamL([torch.zeros(1, requires_grad=True)], **kwargs)


def test_master_weights_follow_a_parameter_changed_to_half_precision():
    # p.data = ... to another dtype lays the state out again: a bf16 parameter gains a master
    # weight from its value, a float32 one loses it.
    p = torch.ones(10, requires_grad=True)
    opt = AdamL([p], master_weights=True)
    _train(opt, [p], [0], "cpu")
    assert "master_param" not in opt.state[p]
    p.data = p.data.to(BF16)
    _train(opt, [p], [1], "cpu")
    assert opt.state[p]["master_param"].dtype == torch.float32
    p.data = p.data.float()
    _train(opt, [p], [2], "cpu")
    assert "master_param" not in opt.state[p]


def test_param_index_is_the_position_across_groups():
    # Stochastic rounding's j is the parameter's key in state_dict(): a group added later
    # continues the count, and the same layout rounds the same way however it was built.
    def run(split):
        ps = [torch.ones(2048, dtype=BF16, requires_grad=True) for _ in range(3)]
        opt = AdamL(ps[:split], lr=1.0, eps=0.0, weight_decay=2.0**-9,
                    decoupled_weight_decay=True, stochastic_rounding=True)
        if split < 3:
            opt.add_param_group({"params": ps[split:]})
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step(1.0)
        return [p.detach().view(torch.int16) for p in ps]

    a, b = run(3), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # other indices, other bits


def test_sync_master_weights_takes_parameters_changed_outside_the_optimizer():
    p = torch.ones(8, dtype=BF16, requires_grad=True)
    opt = AdamL([p], lr=1e-3, master_weights=True)
    _train(opt, [p], [0], "cpu")
    with torch.no_grad():
        p.fill_(2.0)  # e.g. model.load_state_dict(...) without the optimizer's state
    opt.sync_master_weights()
    assert torch.all(opt.state[p]["master_param"] == 2.0)
    _train(opt, [p], [1], "cpu")
    assert torch.all((p - 2.0).abs() < 0.02)  # stepped from 2.0, not from the stale 1.0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_options_and_continue_bitwise(how):
    import copy
    import pickle

    params = [torch.randn(300).to(BF16).requires_grad_()]
    opt = AdamL(params, lr=0.01, **MODES["everything"])
    _train(opt, params, [0, 1], "cpu")
    if how == "deepcopy":
        params2, opt2 = copy.deepcopy((params, opt))
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert opt2.precision == opt.precision
    _train(opt, params, [2], "cpu")
    _train(opt2, params2, [2], "cpu")
    assert torch.equal(params[0].view(torch.int16), params2[0].view(torch.int16))
    assert torch.equal(opt.state[params[0]]["master_param"],
                       opt2.state[params2[0]]["master_param"])
