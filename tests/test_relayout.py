"""When parameters join, change or are reset, only their state is laid out again: every other
parameter's moments stay where they are (no copy of the whole group's state), and the results
are those of an optimizer that never moved anything (issue 19)."""

import pytest
import torch

from adaml_kernels import AdamL, available_backends
from adaml_kernels.plan import ALIGN_BYTES, ROW_GAP_BYTES

BACKENDS = ["reference"] + [b for b in ("cpu",) if b in available_backends()]
SIZES = ((64, 32), (7,), (2049,), (16, 8))


def make(backend, **kwargs):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SIZES]
    return params, AdamL(params, backend=backend, lr=0.01, **kwargs)


def step(params, opt, seed, with_grad=None):
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))  # p's layout
        p.grad = grad if with_grad is None or i in with_grad else None
    opt.step(2.0 - 0.1 * seed)
    opt.zero_grad()


def addresses(opt, params):
    return [(opt.state[p]["exp_avg"].data_ptr(), opt.state[p]["exp_avg_sq"].data_ptr())
            for p in params]


def own_buffer_bytes(opt, p) -> int:
    """The bytes of the flat buffer that holds p's moments."""
    return opt.state[p]["exp_avg"].untyped_storage().nbytes()


def bound(p) -> int:
    """A buffer of p's moments alone: two 64-byte-aligned rows and the gap between them."""
    row = -(-p.numel() * 4 // ALIGN_BYTES) * ALIGN_BYTES
    return 2 * row + ROW_GAP_BYTES


def logical_state(opt, params):
    return [(p.detach().clone(), opt.state[p]["exp_avg"].clone(),
             opt.state[p]["exp_avg_sq"].clone()) for p in params]


def assert_same(a, b):
    for x, y in zip(a, b):
        assert all(map(torch.equal, x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_late_parameter_gets_a_buffer_of_its_own(backend):
    params, opt = make(backend)
    for k in range(3):
        step(params, opt, k, with_grad={0, 1, 2})
    before = addresses(opt, params[:3])
    step(params, opt, 3)  # params[3]: its first gradient
    assert addresses(opt, params[:3]) == before
    assert own_buffer_bytes(opt, params[3]) <= bound(params[3])
    assert float(opt.state[params[3]]["step"]) == 1
    assert [float(opt.state[p]["step"]) for p in params[:3]] == [4, 4, 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_changed_in_place_moves_alone_and_keeps_its_moments(backend):
    runs = []
    for change in (False, True):
        params, opt = make(backend)
        for k in range(2):
            step(params, opt, k)
        before = addresses(opt, params)
        if change:  # the same values, laid out column-major: its moments follow
            params[0].data = params[0].data.t().contiguous().t()
        step(params, opt, 2)
        step(params, opt, 3)
        if change:
            assert addresses(opt, params[1:]) == before[1:]
            assert addresses(opt, params[:1]) != before[:1]
            assert opt.state[params[0]]["exp_avg"].stride() == params[0].stride()
            assert own_buffer_bytes(opt, params[0]) <= bound(params[0])
        runs.append(logical_state(opt, params))
    assert_same(*runs)  # element-wise: the layout changes no value


RESETS = {
    "del": lambda opt, p: opt.state.__delitem__(p),
    "clear": lambda opt, p: opt.state[p].clear(),
    "assign": lambda opt, p: opt.state.__setitem__(p, {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", RESETS)
def test_a_reset_parameter_starts_afresh_in_a_buffer_of_its_own(backend, reset):
    params, opt = make(backend)
    for k in range(3):
        step(params, opt, k)
    before = addresses(opt, params)
    RESETS[reset](opt, params[2])
    step(params, opt, 3)
    assert addresses(opt, [params[i] for i in (0, 1, 3)]) == [before[i] for i in (0, 1, 3)]
    assert own_buffer_bytes(opt, params[2]) <= bound(params[2])
    assert [float(opt.state[p]["step"]) for p in params] == [4, 4, 1, 4]
    # its moments are those of one step from zero: m = (1 - b1) g
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    torch.testing.assert_close(opt.state[params[2]]["exp_avg"], 0.1 * grads[2], rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loaded_state_is_laid_out_in_one_buffer(backend):
    params, opt = make(backend)
    for k in range(2):
        step(params, opt, k)
    sd = {"state": {i: {k: v.clone() if isinstance(v, torch.Tensor) else v
                        for k, v in st.items()} for i, st in opt.state_dict()["state"].items()},
          "param_groups": opt.state_dict()["param_groups"]}
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = AdamL(resumed, backend=backend, lr=0.01)
    opt2.load_state_dict(sd)
    for k in range(2, 4):
        step(params, opt, k)
        step(resumed, opt2, k)
    assert len({opt2.state[p]["exp_avg"].untyped_storage().data_ptr() for p in resumed}) == 1
    assert_same(logical_state(opt, params), logical_state(opt2, resumed))
