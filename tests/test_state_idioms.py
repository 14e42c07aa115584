"""torch.optim idioms that reach into an optimizer's state, its param groups or its loss, and
AdamL's answer to each: what torch.optim.Adam does, on the general path and on the fast path
(issue 19)."""

import collections
import operator

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
        opt.step(loss(k)) if isinstance(opt, AdamL) else opt.step()
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
            x, y = (torch.as_tensor(v) for v in (sa[k][key], sb[k][key]))  # (numbers: f_1, count)
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


# ------------------------------------------------------------------ an entry cleared in place

def adam_steps_after_reset(reset, seeds=range(3)):
    """Each parameter's step count in torch.optim.Adam after 3 steps, `reset`, and 2 steps."""
    params, adam = make(None, torch.optim.Adam)
    train(params, adam, seeds)
    reset(params, adam)
    saved = {k: sorted(st) for k, st in adam.state_dict()["state"].items()}
    train(params, adam, range(3, 5))
    return saved, [int(adam.state[p]["step"]) for p in params]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_entry_cleared_in_place_resets_its_parameter_as_del_does(backend):
    def clear(params, opt):
        opt.state[params[0]].clear()

    def delete(params, opt):
        del opt.state[params[0]]

    runs = []
    for reset in (clear, delete):
        params, opt = make(backend, normalize_loss=True)
        train(params, opt, range(3))
        reset(params, opt)
        saved = {k: sorted(st) for k, st in opt.state_dict()["state"].items()}
        train(params, opt, range(3, 5))
        runs.append(snapshot(params, opt))
        if reset is clear:
            adam_saved, adam_steps = adam_steps_after_reset(clear)
            assert saved.keys() == adam_saved.keys() and saved[0] == adam_saved[0] == []
            assert [int(opt.state[p]["step"]) for p in params] == adam_steps == [2, 5, 5]
    assert_same(*runs)


# ------------------------------------------------------------------ reading state is no change

@pytest.mark.parametrize("backend", BACKENDS)
def test_reading_the_state_of_a_parameter_without_state_changes_nothing(backend):
    runs = []
    for read in (False, True):
        params, opt = make(backend, frozen=True)
        frozen = params[-1]
        train(params[:-1], opt, range(3))
        fast, plans, described = opt.engine.fast, list(opt.engine.plans), opt.describe()
        buffers = [opt.state[p]["exp_avg"].data_ptr() for p in params[:-1]]
        if read:
            assert len(opt.state[frozen]) == 0  # inserts an empty entry, as a defaultdict does
        train(params[:-1], opt, range(3, 5))
        assert opt.engine.fast is fast  # nothing re-planned
        assert all(map(operator.is_, opt.engine.plans, plans))
        assert opt.describe() == described
        assert [opt.state[p]["exp_avg"].data_ptr() for p in params[:-1]] == buffers
        runs.append(snapshot(params, opt))
        if read:  # saved as torch.optim.Adam saves it
            _, adam = make(None, torch.optim.Adam, frozen=True)
            _ = adam.state[adam.param_groups[0]["params"][-1]]
            assert opt.state_dict()["state"][3] == adam.state_dict()["state"][3] == {}
    runs[1][1].pop(3)
    assert_same(*runs)


# ------------------------------------------------------------------ the whole state reset

RESETS = {
    "assign": lambda opt: setattr(opt, "state", collections.defaultdict(dict)),
    "clear": lambda opt: opt.state.clear(),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", RESETS)
def test_a_reset_state_starts_every_parameter_afresh_as_a_new_optimizer(backend, reset):
    """Everything the state holds starts again, f_1 and the skip count too (as when an empty
    state dict is loaded), as torch.optim.Adam starts every parameter afresh."""
    params, opt = make(backend, normalize_loss=True)
    train(params, opt, range(3))
    opt.step(float("nan"))  # a skipped step: the count starts again too
    RESETS[reset](opt)
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = AdamL(fresh_params, backend=backend, normalize_loss=True)
    seeds, late_loss = range(3, 5), lambda k: torch.tensor(1.0 - 0.1 * k)
    for ps, o in ((params, opt), (fresh_params, fresh)):
        train(ps, o, [2], lambda k: float("inf"))  # skipped: counted afresh
    train(params, opt, seeds, late_loss)
    train(fresh_params, fresh, seeds, late_loss)
    assert_same(snapshot(params, opt), snapshot(fresh_params, fresh))

    adam_params, adam = make(None, torch.optim.Adam)
    train(adam_params, adam, range(3))
    RESETS[reset](adam)
    train(adam_params, adam, seeds)
    assert [int(opt.state[p]["step"]) for p in params] == [
        int(adam.state[p]["step"]) for p in adam_params] == [2, 2, 2]


# ------------------------------------------------------------------ a new Parameter, same storage

class GeneralOnly(AdamL):
    """AdamL with every step on the general path."""

    def _step(self, loss=None, closure=None):
        return self._general_step(loss, closure)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_parameter_over_the_same_storage_starts_afresh_on_both_paths(backend):
    runs = []
    for cls in (AdamL, GeneralOnly, torch.optim.Adam):
        params, opt = make(backend, cls)
        train(params, opt, range(3))
        old = params[0]
        params[0] = opt.param_groups[0]["params"][0] = torch.nn.Parameter(old.data)
        train(params, opt, range(3, 5))
        assert int(opt.state[old]["step"]) == 3  # the old object's entry stays, as in torch
        runs.append([int(opt.state[p]["step"]) for p in params])
        if cls is not torch.optim.Adam:
            runs[-1] += [p.detach().clone() for p in params] + [
                opt.state[p][key].clone() for p in params for key in ("exp_avg", "exp_avg_sq")]
    assert runs[0][:3] == runs[2] == [2, 5, 5]
    assert runs[0][:3] == runs[1][:3] and all(map(torch.equal, runs[0][3:], runs[1][3:]))
