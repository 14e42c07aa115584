"""The steady-state path (fast_path.py, csrc/adaml_fast_path.cpp) against the general path: taken in
steady state, bitwise the same results, and every check still made."""

import math

import pytest
import torch

import adaml_kernels
from adaml_kernels import AdamL

FAST = [b for b in ("cpu", "cuda") if b in adaml_kernels.available_backends()]
pytestmark = pytest.mark.skipif(not FAST, reason="the fast path needs the cpu or cuda backend")


class GeneralOnly(AdamL):
    """AdamL with every step on the general path."""

    def _step(self, loss=None, closure=None):
        return self._general_step(loss, closure)


def device_of(backend):
    return "cuda" if backend == "cuda" else "cpu"


def make(cls, backend, sizes=((3, 4), (7,), (2049,), (1,)), **kwargs):
    g = torch.Generator().manual_seed(0)
    device = device_of(backend)
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in sizes]
    return params, cls(params, backend=backend, **kwargs)


def set_grads(params, seed):
    """New gradients laid out like their parameters, as autograd makes them."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))


def count_general_steps(monkeypatch) -> list:
    """A list that grows by one at every step AdamL takes on the general path."""
    calls = []
    general = AdamL._general_step
    monkeypatch.setattr(AdamL, "_general_step",
                        lambda self, *a, **k: calls.append(1) or general(self, *a, **k))
    return calls


def assert_same(a, b, opt_a, opt_b):
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            x, y = sa[key], sb[key]
            assert torch.equal(x, y) or (x.isnan().all() and y.isnan().all())


@pytest.mark.parametrize("backend", FAST)
def test_steady_state_takes_the_fast_path(backend, monkeypatch):
    params, opt = make(AdamL, backend)
    set_grads(params, 0)
    opt.step(1.0)
    calls = count_general_steps(monkeypatch)
    for k in range(1, 5):
        set_grads(params, k)  # new gradient tensors, as zero_grad() + backward() give
        opt.step(torch.tensor(1.0 - 0.1 * k, device=device_of(backend)))
    assert calls == []
    assert float(opt.state[params[0]]["step"]) == 5


@pytest.mark.parametrize("backend", FAST)
def test_fast_and_general_paths_agree_bitwise_through_every_change(backend):
    kwargs = dict(lr=torch.tensor(0.05), normalize_loss=True, weight_decay=0.01, phi=1.5)
    if backend == "cuda":
        kwargs["lr"] = kwargs["lr"].cuda()
    runs = []
    for cls in (AdamL, GeneralOnly):
        params, opt = make(cls, backend, **{**kwargs, "lr": kwargs["lr"].clone()})
        device = params[0].device
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for k in range(12):
            set_grads(params, k)
            if k == 3:
                params[0].grad = None
                params[0].data = params[0].data.t().contiguous().t()  # other strides
                set_grads(params, k)
            if k == 5:
                params[1].grad = None  # a parameter without gradient, then back
            if k == 7:
                del opt.state[params[2]]
            if k == 8:
                extra = torch.ones(5, device=device, requires_grad=True)
                opt.add_param_group({"params": [extra]})
                params.append(extra)
                extra.grad = torch.full_like(extra, 0.5)
            loss = [2.0, 1.5, math.nan, 1.2, 1.1, 1.0, 0.9, math.inf, 0.8, 0.7, 0.6, 0.5][k]
            if k % 3 == 0:
                opt.add_loss(torch.tensor(loss / 2, device=device))
                opt.add_loss(torch.tensor(loss / 2, device=device))
                opt.step()
            else:
                opt.step(torch.tensor(loss, device=device) if k % 2 else loss)
            sched.step()
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    assert opt_a.skipped_steps == opt_b.skipped_steps == 2
    assert_same(a, b, opt_a, opt_b)
    assert torch.equal(opt_a.last_step_taken, opt_b.last_step_taken)


@pytest.mark.parametrize("backend", FAST)
def test_grad_scaler_on_the_fast_path(backend):
    device = device_of(backend)
    runs = []
    for cls in (AdamL, GeneralOnly):
        params, opt = make(cls, backend, lr=0.05)
        for k in range(5):
            set_grads(params, k)
            opt.grad_scale = torch.tensor(4.0, device=device)
            opt.found_inf = torch.tensor(1.0 if k == 3 else 0.0, device=device)
            opt.step(torch.tensor(1.5, device=device))
            del opt.grad_scale, opt.found_inf
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    assert opt_a.skipped_steps == 1
    assert_same(a, b, opt_a, opt_b)


@pytest.mark.parametrize("backend", FAST)
def test_every_check_still_raises_before_anything_changes(backend):
    params, opt = make(AdamL, backend)
    for k in range(3):
        set_grads(params, k)
        opt.step(1.0)
    assert opt.engine.fast is not None
    snapshot = ([p.detach().clone() for p in params],
                [{key: v.clone() for key, v in opt.state[p].items()} for p in params])

    def unchanged():
        return all(torch.equal(p, q) for p, q in zip(params, snapshot[0])) and all(
            torch.equal(opt.state[p][key], v) or v.isnan().all()
            for p, st in zip(params, snapshot[1]) for key, v in st.items())

    set_grads(params, 9)
    params[0].grad = params[0].grad.t().contiguous().t()  # laid out unlike its parameter
    assert params[0].grad.stride() != params[0].stride()
    with pytest.raises(ValueError, match="same strides"):
        opt.step(1.0)
    assert unchanged()
    set_grads(params, 9)
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(1.0)
    assert unchanged()
    set_grads(params, 9)
    params[2].data = params[2].data[:1024]
    params[2].grad = None
    params[2].grad = torch.ones(1024, device=params[2].device)
    with pytest.raises(ValueError, match="changed in place"):
        opt.step(1.0)
    params[2].data = snapshot[0][2].clone()
    params[2].grad = None
    assert unchanged()


@pytest.mark.parametrize("backend", FAST)
def test_a_loss_on_another_device_or_a_closure_takes_the_general_path(backend, monkeypatch):
    params, opt = make(AdamL, backend)
    set_grads(params, 0)
    opt.step(1.0)
    calls = count_general_steps(monkeypatch)
    set_grads(params, 1)
    opt.step(lambda: torch.tensor(1.0))
    set_grads(params, 2)
    opt.step(torch.tensor(1, device=params[0].device))  # an integer loss
    assert len(calls) == 2


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("options", [
    dict(stochastic_rounding=True), dict(master_weights=True),
    dict(state_dtype=torch.bfloat16, stochastic_rounding=True, master_weights=True),
], ids=["sr", "master", "everything"])
def test_low_precision_modes_agree_bitwise_on_both_paths(backend, options):
    device = device_of(backend)
    runs = []
    for cls in (AdamL, GeneralOnly):
        g = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=g).to(device, torch.bfloat16).requires_grad_()
                  for s in ((3, 4), (2049,), (5,))]
        opt = cls(params, lr=0.01, backend=backend, seed=7, **options)
        for k in range(4):
            set_grads(params, k)
            opt.step(torch.tensor([1.5, 1.2, math.nan, 1.1][k], device=device))
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    assert_same(a, b, opt_a, opt_b)


@pytest.mark.parametrize("backend", FAST)
def test_a_parameter_moved_to_the_reference_path_returns_when_its_layout_does(backend,
                                                                              monkeypatch):
    # Under "auto", one step with a gradient laid out unlike its parameter takes that parameter
    # through the reference path; once the layouts agree again it goes back to its fused
    # bucket, and the steady state to the fast path.
    params, opt = make(AdamL, "auto")
    set_grads(params, 0)
    opt.step(1.0)
    set_grads(params, 1)
    params[0].grad = params[0].grad.t().contiguous().t()
    opt.step(0.9)
    assert {b["backend"] for b in opt.describe()[0]} == {backend, "reference"}
    set_grads(params, 2)
    opt.step(0.8)
    assert {b["backend"] for b in opt.describe()[0]} == {backend}
    calls = count_general_steps(monkeypatch)
    for k in range(3, 6):
        set_grads(params, k)
        opt.step(1.0 - 0.1 * k)
    assert calls == []
    assert float(opt.state[params[0]]["step"]) == 6
