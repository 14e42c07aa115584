"""Checkpoints that pass through torch.optim.Adam and come back: nothing of AdamL's is lost or
bent, and nothing Adam left behind wins over what Adam trained."""

import pytest
import torch

from adaml_kernels import AdamL, available_backends

BACKENDS = [b for b in ("reference", "cpu") if b in available_backends("cpu")]


def train(opt, params, steps, loss=2.3456789):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        if isinstance(opt, AdamL):
            opt.step(loss)
        else:
            opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
def test_f1_and_the_skip_count_survive_a_bf16_adam_round_trip_exactly(backend):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16)) for _ in range(2)]
    opt = AdamL(params, lr=1e-3, backend=backend)
    train(opt, params, 1, loss=2.3456789)
    for _ in range(301):  # skipped steps
        train(opt, params, 1, loss=float("nan"))
    adam = torch.optim.Adam(params, lr=1e-3)
    adam.load_state_dict(opt.state_dict())  # Adam casts floating state to the params' dtype
    back = AdamL(params, lr=1e-3, backend=backend)
    back.load_state_dict(adam.state_dict())
    assert float(back.initial_loss) == 2.3456789
    assert back.skipped_steps == 301


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_master_weight_adam_did_not_update_does_not_undo_adams_training(backend):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    opt = AdamL([p], lr=1e-3, backend=backend, master_weights=True)
    train(opt, [p], 2)
    adam = torch.optim.Adam([p], lr=0.1)
    adam.load_state_dict(opt.state_dict())  # carries master_param along, never updates it
    for st in adam.state.values():  # Adam's own moments, so that it moves p at its own pace
        st["exp_avg"].zero_(), st["exp_avg_sq"].zero_(), st["step"].zero_()
    adam.param_groups[0]["lr"] = 0.1  # (loading took AdamL's lr)
    before = p.detach().clone()
    train(adam, [p], 50)
    trained = p.detach().clone()
    assert (trained.float() - before.float()).abs().max() > 0.5  # Adam moved p
    back = AdamL([p], lr=1e-6, backend=backend, master_weights=True)
    back.load_state_dict(adam.state_dict())
    back.param_groups[0]["lr"] = 1e-6
    train(back, [p], 1)
    # A tiny step from where Adam left p, not a jump back to the stale master weight.
    assert (p.detach().float() - trained.float()).abs().max() <= 2 ** -6  # an ulp or two
    assert torch.equal(back.state[p]["master_param"].to(torch.bfloat16), p.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_amsgrad_checkpoint_leaves_no_max_exp_avg_sq(backend):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16))]
    adam = torch.optim.Adam(params, lr=1e-3, amsgrad=True)
    train(adam, params, 2)
    opt = AdamL(params, lr=1e-3, backend=backend)
    opt.load_state_dict(adam.state_dict())
    train(opt, params, 1)
    assert "max_exp_avg_sq" not in opt.state[params[0]]
    assert "max_exp_avg_sq" not in opt.state_dict()["state"][0]
