"""EAdam and AdaBelief against steps worked out by hand, and AdamL's reduction to EAdam."""

import math

import pytest
import torch

from adaml_kernels import AdamL
from adaml_kernels.experiments.baselines import AdaBelief, EAdam

# One scalar parameter, p0 = 1, two steps with the given gradients g1 = 2, g2 = -3.
# lr = 0.1, betas = (0.5, 0.75), eps = 0.01: eps is large so that where it enters shows.
LR, BETAS, EPS = 0.1, (0.5, 0.75), 0.01


def _two_steps(opt_class):
    p = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = opt_class([p], lr=LR, betas=BETAS, eps=EPS)
    trace = []
    for g in (2.0, -3.0):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        st = opt.state[p]
        trace.append((p.item(), st["exp_avg"].item(), st["exp_avg_sq"].item(), st["step"]))
    return trace


def test_eadam_by_hand():
    (p1, m1, v1, k1), (p2, m2, v2, k2) = _two_steps(EAdam)
    # step 1: m = 0.5*0 + 0.5*2 = 1;  v = 0.75*0 + 0.25*2^2 + 0.01 = 1.01
    #         m_hat = 1/(1-0.5) = 2;  v_hat = 1.01/(1-0.75) = 4.04
    assert (m1, k1) == (1.0, 1)
    assert v1 == pytest.approx(1.01, rel=1e-14)
    assert p1 == pytest.approx(1.0 - 0.1 * 2.0 / (math.sqrt(4.04) + 0.01), rel=1e-14)
    # step 2: m = 0.5*1 + 0.5*(-3) = -1;  v = 0.75*1.01 + 0.25*9 + 0.01 = 3.0175
    #         m_hat = -1/(1-0.25) = -4/3;  v_hat = 3.0175/(1-0.5625) = 3.0175/0.4375
    assert (m2, k2) == (-1.0, 2)
    assert v2 == pytest.approx(3.0175, rel=1e-14)
    assert p2 == pytest.approx(p1 + 0.1 * (4 / 3) / (math.sqrt(3.0175 / 0.4375) + 0.01), rel=1e-14)
    # the numbers themselves (evaluated once with a calculator)
    assert p1 == pytest.approx(0.9009888797136, abs=1e-12)
    assert p2 == pytest.approx(0.9515659411653, abs=1e-12)


def test_adabelief_by_hand():
    (p1, m1, s1, k1), (p2, m2, s2, k2) = _two_steps(AdaBelief)
    # step 1: m = 1;  s = 0.75*0 + 0.25*(2 - 1)^2 + 0.01 = 0.26   (g - m uses the new m)
    #         m_hat = 2;  s_hat = 0.26/0.25 = 1.04
    assert (m1, k1) == (1.0, 1)
    assert s1 == pytest.approx(0.26, rel=1e-14)
    assert p1 == pytest.approx(1.0 - 0.1 * 2.0 / (math.sqrt(1.04) + 0.01), rel=1e-14)
    # step 2: m = -1;  s = 0.75*0.26 + 0.25*(-3 - (-1))^2 + 0.01 = 0.195 + 1 + 0.01 = 1.205
    #         m_hat = -4/3;  s_hat = 1.205/0.4375
    assert (m2, k2) == (-1.0, 2)
    assert s2 == pytest.approx(1.205, rel=1e-14)
    assert p2 == pytest.approx(p1 + 0.1 * (4 / 3) / (math.sqrt(1.205 / 0.4375) + 0.01), rel=1e-14)
    assert p1 == pytest.approx(0.8057882675799, abs=1e-12)
    assert p2 == pytest.approx(0.8856475196285, abs=1e-12)


def test_elementwise_and_skips_params_without_grad():
    a = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)
    opt = EAdam([a, b], lr=LR, betas=BETAS, eps=EPS)
    a.grad = torch.tensor([2.0, -2.0], dtype=torch.float64)
    opt.step()
    # the same first step as above, mirrored for the second element; b has no grad
    step1 = 0.1 * 2.0 / (math.sqrt(4.04) + 0.01)
    expected = torch.tensor([1.0 - step1, -1.0 + step1], dtype=torch.float64)
    torch.testing.assert_close(a.detach(), expected, rtol=1e-14, atol=0)
    assert b.item() == 5.0 and b not in opt.state


@pytest.mark.parametrize("cls", [EAdam, AdaBelief])
def test_invalid_hyperparameters(cls):
    p = torch.zeros(1, requires_grad=True)
    for kwargs in (dict(lr=0.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0)):
        with pytest.raises(ValueError):
            cls([p], **kwargs)


GRADS = [[0.3, -1.2, 4.0], [-0.7, 0.1, 2.5], [1.5, 1.5, -0.2], [0.0, -3.0, 0.9]]


@pytest.mark.parametrize("phi", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("how", ["loss_is_one", "offset_is_loss_minus_one"])
def test_adaml_with_unit_loss_has_eadams_moments(how, phi):
    """SPEC.md: gamma = 1 and loss - f* = 1 on every step gives EAdam's second moment."""
    kw = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-3)  # a large eps makes the term visible
    p_l = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p_e = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    adaml = AdamL([p_l], gamma=1.0, phi=phi, backend="reference", **kw)
    eadam = EAdam([p_e], **kw)
    losses = [3.7, 0.25, -12.0, 1e4]
    for g, loss in zip(GRADS, losses):
        # the same gradient for both: the parameters differ (the updates' denominators do)
        p_l.grad = torch.tensor(g, dtype=torch.float64)
        p_e.grad = torch.tensor(g, dtype=torch.float64)
        if how == "loss_is_one":
            adaml.step(1.0)
        else:
            adaml.param_groups[0]["loss_offset"] = loss - 1.0
            adaml.step(torch.tensor(loss, dtype=torch.float64))
        eadam.step()
        sl, se = adaml.state[p_l], eadam.state[p_e]
        torch.testing.assert_close(sl["exp_avg"], se["exp_avg"], rtol=1e-12, atol=0)
        torch.testing.assert_close(sl["exp_avg_sq"], se["exp_avg_sq"], rtol=1e-12, atol=0)
    assert float(adaml.state[p_l]["step"]) == eadam.state[p_e]["step"] == 4
