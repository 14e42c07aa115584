"""torch.optim idioms that reach into an optimizer's state, its param groups or its loss, and
AdamL's answer to each: what torch.optim.Adam does, on the general path and on the fast path
(issue 19)."""

import pytest
import torch

from adaml_kernels import AdamL, available_backends

BACKENDS = ["reference"] + [b for b in ("cpu",) if b in available_backends()]
SIZES = ((5, 3), (7,), (2049,))


def make(backend, cls=AdamL, frozen=False, **kwargs):
    """Parameters (the last without gradients if `frozen`) and an optimizer over them."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g))
              for s in SIZES + (((4,),) if frozen else ())]
    return params, cls(params, **({} if cls is torch.optim.Adam else {"backend": backend}),
                       **kwargs)


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def train(params, opt, seeds, loss=lambda k: torch.tensor(2.0 - 0.1 * k)):
    for k in seeds:
        set_grads(params, k)
        opt.step(loss(k))
        opt.zero_grad()


def snapshot(params, opt):
    """Everything a step may change: parameters, the saved state, f_1 and the skip count."""
    state = {k: {key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in st.items()}
             for k, st in opt.state_dict()["state"].items()}
    f1 = None if opt.initial_loss is None else opt.initial_loss.clone()
    return [p.detach().clone() for p in params], state, f1, opt.skipped_steps


def assert_same(a, b):
    (pa, sa, fa, ka), (pb, sb, fb, kb) = a, b
    assert all(map(torch.equal, pa, pb))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), k
        for key in sa[k]:
            x, y = sa[k][key], sb[k][key]
            assert torch.equal(x, y) or (x.isnan().all() and y.isnan().all()), (k, key)
    assert (fa is None) == (fb is None) and (fa is None or torch.equal(fa, fb) or (
        fa.isnan() and fb.isnan()))
    assert ka == kb


# ------------------------------------------------------------------ a loss with no usable value

UNUSABLE_LOSSES = [
    pytest.param(lambda: torch.tensor(1.0, device="meta"), "meta", id="meta"),
    *[pytest.param(lambda dt=dt: torch.tensor(1.0).to(dt), "dtype", id=str(dt))
      for dt in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2")) if dt],
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "steady_state"])
@pytest.mark.parametrize("make_loss, words", UNUSABLE_LOSSES)
def test_a_meta_or_float8_loss_raises_before_anything_changes(backend, warm, make_loss, words):
    params, opt = make(backend)
    if warm:
        train(params, opt, range(3))
    before, entries = snapshot(params, opt), len(opt.state)
    set_grads(params, 9)
    with pytest.raises(ValueError, match=words):
        opt.step(make_loss())
    with pytest.raises(ValueError, match=words):
        opt.add_loss(make_loss())
    assert len(opt.state) == entries
    assert_same(snapshot(params, opt), before)
