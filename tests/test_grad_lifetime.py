"""Gradients belong to the training loop: after `opt.step(loss); opt.zero_grad()` (set_to_none)
nothing in the optimizer keeps one alive, on the first step, on the general path and on the
fast path. The tables keep raw addresses only, so a step must never launch one that is stale
(issue 19)."""

import gc
import weakref

import pytest
import torch

from adaml_kernels import AdamL, available_backends

BACKENDS = ["reference"] + [b for b in ("cpu",) if b in available_backends()]


class GeneralOnly(AdamL):
    """AdamL with every step on the general path."""

    def _step(self, loss=None, closure=None):
        return self._general_step(loss, closure)


def make(backend, cls=AdamL, sizes=((5, 3), (7,), (2049,)), **kwargs):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in sizes]
    return params, cls(params, backend=backend, **kwargs)


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def alive_after_zero_grad(params, opt, seed, loss) -> int:
    """How many of this step's gradients outlive zero_grad(set_to_none=True)."""
    set_grads(params, seed)
    refs = [weakref.ref(p.grad) for p in params]
    opt.step(loss)
    opt.zero_grad(set_to_none=True)
    gc.collect()
    return sum(r() is not None for r in refs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [AdamL, GeneralOnly])
def test_no_gradient_outlives_zero_grad(backend, cls):
    params, opt = make(backend, cls)
    for k in range(4):  # the first step plans; the later ones take the fast path where it applies
        assert alive_after_zero_grad(params, opt, k, torch.tensor(2.0 - 0.1 * k)) == 0, k
    if backend == "cpu" and cls is AdamL:
        assert opt.engine.fast is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_outlives_zero_grad_through_plan_changes(backend):
    params, opt = make(backend)
    assert alive_after_zero_grad(params, opt, 0, 2.0) == 0
    frozen = params[1]
    active = [params[0], params[2]]
    for k in range(1, 3):  # a parameter without gradient: a new plan, then its steady state
        set_grads(active, k)
        refs = [weakref.ref(p.grad) for p in active]
        opt.step(1.5)
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert all(r() is None for r in refs)
    assert frozen.grad is None
    for k in range(3, 5):  # every gradient back
        assert alive_after_zero_grad(params, opt, k, 1.0) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_over_released_gradients_match_the_general_path_bitwise(backend):
    """New gradients land where released ones were (or anywhere): every step reads them."""
    runs = []
    for cls in (AdamL, GeneralOnly):
        params, opt = make(backend, cls, normalize_loss=True)
        for k in range(6):
            set_grads(params, k)
            opt.step(torch.tensor(2.0 - 0.2 * k))
            opt.zero_grad(set_to_none=True)
        runs.append([p.detach().clone() for p in params]
                    + [opt.state[p][key].clone() for p in params for key in ("exp_avg",
                                                                             "exp_avg_sq")])
    assert all(map(torch.equal, *runs))


def test_a_gradient_at_a_released_ones_address_but_laid_out_otherwise_is_noticed():
    """The plan no longer holds its gradients, so a gradient at a planned address may be another
    tensor: here the transpose of the last one (the fused kernel would read it untransposed)."""
    if "cpu" not in available_backends():
        pytest.skip("needs the cpu backend")
    buf = torch.randn(4, 4)
    runs = []
    for backend, transposed in (("auto", True), ("reference", False)):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 4, generator=g))
        opt = AdamL([p], backend=backend)
        p.grad = buf.view(4, 4)
        opt.step(1.0)
        p.grad = buf.t() if transposed else buf.t().contiguous()  # same address when transposed
        opt.step(1.0)
        runs.append(p.detach().clone())
        if transposed:
            assert opt.describe()[0][0]["backend"] == "reference"  # auto: unlike its param
    torch.testing.assert_close(*runs)
