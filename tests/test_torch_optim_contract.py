"""AdamL held to torch.optim's behaviour: state dicts, hooks, schedulers, copies, messages."""

import copy
import io
import math
import pickle

import pytest
import torch

from adaml_kernels import AdamL
from parity import cpu_testable_backends

BACKENDS = cpu_testable_backends()


def model_and_data(device="cpu", seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model.to(device), torch.randn(32, 4, device=device), torch.randn(32, 1, device=device)


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss)


def params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------- state dicts


def test_state_entries_that_are_no_parameter_are_saved_and_loaded():
    model, x, y = model_and_data()
    opt = AdamL(model.parameters(), lr=0.01)
    train(model, opt, x, y, 1)
    opt.state["note"] = 1
    opt.state["counts"] = {"seen": torch.tensor(3)}
    sd = opt.state_dict()
    assert sd["state"]["note"] == 1 and int(sd["state"]["counts"]["seen"]) == 3
    opt2 = AdamL(model_and_data()[0].parameters(), lr=0.01)
    opt2.load_state_dict(sd)
    assert opt2.state["note"] == 1 and int(opt2.state["counts"]["seen"]) == 3


def test_save_load_save_is_deterministic_and_adds_no_keys():
    model, x, y = model_and_data()
    opt = AdamL(model.parameters(), lr=0.01)
    train(model, opt, x, y, 2)
    first = opt.state_dict()
    copied = copy.deepcopy(opt)
    assert copied.param_groups[0].keys() == opt.param_groups[0].keys()
    opt.load_state_dict(first)
    second = opt.state_dict()
    assert "differentiable" not in second["param_groups"][0]
    assert first["param_groups"] == second["param_groups"]
    assert first["state"].keys() == second["state"].keys()
    for k in first["state"]:
        for name, value in first["state"][k].items():
            other = second["state"][k][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other) or value.isnan().all()
            else:  # f_1 and the skip count are saved as numbers
                assert value == other or (math.isnan(value) and math.isnan(other))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_weights_only_load_resumes_bitwise(backend, device):
    model, x, y = model_and_data(device)
    twin = copy.deepcopy(model)
    opt = AdamL(model.parameters(), lr=0.01, normalize_loss=True, backend=backend)
    opt_twin = AdamL(twin.parameters(), lr=0.01, normalize_loss=True, backend=backend)
    train(model, opt, x, y, 2)
    train(twin, opt_twin, x, y, 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt = AdamL(model.parameters(), lr=0.01, normalize_loss=True, backend=backend)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    train(model, opt, x, y, 3)
    train(twin, opt_twin, x, y, 3)
    assert params_equal(model, twin)


def test_named_parameters_give_named_state_dicts():
    model, x, y = model_and_data()
    opt = AdamL(model.named_parameters(), lr=0.01)
    train(model, opt, x, y, 1)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    model2 = copy.deepcopy(model)
    opt2 = AdamL(model2.named_parameters(), lr=0.01)
    opt2.load_state_dict(sd)
    train(model, opt, x, y, 2)
    train(model2, opt2, x, y, 2)
    assert params_equal(model, model2)


# --------------------------------------------------------------------------------- hooks


def test_load_state_dict_hooks_see_what_torch_optim_shows_them():
    model, x, y = model_and_data()
    opt = AdamL(model.parameters(), lr=0.01)
    train(model, opt, x, y, 1)
    sd = opt.state_dict()
    opt2 = AdamL(model.parameters(), lr=0.01)
    seen = {}

    def pre_hook(optimizer, state_dict):
        seen["pre_keys"] = set(state_dict)
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.5
        return state_dict

    def post_hook(optimizer):
        p = optimizer.param_groups[0]["params"][0]
        seen["post_step"] = float(optimizer.state[p]["step"])
        seen["post_lr"] = optimizer.param_groups[0]["lr"]

    opt2.register_load_state_dict_pre_hook(pre_hook)
    opt2.register_load_state_dict_post_hook(post_hook)
    opt2.load_state_dict(sd)
    assert seen == {"pre_keys": {"state", "param_groups"}, "post_step": 1.0,
                    "post_lr": 0.5}


def test_step_and_state_dict_hooks_run():
    model, x, y = model_and_data()
    opt = AdamL(model.parameters(), lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", len(args))))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", len(args))))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd", len(sd["state"]))))
    train(model, opt, x, y, 1)
    opt.state_dict()
    assert calls == [("pre", 2), ("post", 2), ("sd", 4)]  # args: (optimizer, loss)


# ---------------------------------------------------------------- schedulers, copies, no-ops


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_scheduler_changes_the_next_step(tensor_lr):
    model, x, y = model_and_data()
    twin = copy.deepcopy(model)
    lr = torch.tensor(0.02) if tensor_lr else 0.02
    opt = AdamL(model.parameters(), lr=lr, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt_twin = AdamL(twin.parameters(), lr=0.02, backend="reference")
    for lr_now in (0.02, 0.01, 0.005):
        opt_twin.param_groups[0]["lr"] = lr_now
        train(model, opt, x, y, 1)
        train(twin, opt_twin, x, y, 1)
        sched.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_continue_bitwise(how):
    model, x, y = model_and_data()
    opt = AdamL(model.parameters(), lr=0.01, normalize_loss=True, amp_scaling=False,
                backend="reference")
    train(model, opt, x, y, 2)
    bundle = {"model": model, "opt": opt}
    copied = copy.deepcopy(bundle) if how == "deepcopy" else pickle.loads(pickle.dumps(bundle))
    model2, opt2 = copied["model"], copied["opt"]
    assert (opt2.backend, opt2.amp_scaling) == ("reference", False)
    assert float(opt2.initial_loss) == float(opt.initial_loss)
    train(model, opt, x, y, 2)
    train(model2, opt2, x, y, 2)
    assert params_equal(model, model2)


def test_steps_without_any_gradient_do_nothing():
    model, _, _ = model_and_data()
    opt = AdamL(model.parameters(), lr=0.01)
    assert opt.step() is None
    assert opt.step(1.5) == 1.5
    assert opt.step(lambda: None) is None
    assert not opt.state and opt.skipped_steps == 0


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1.0), dict(lr=torch.tensor([0.1, 0.2])), dict(eps=-1.0), dict(betas=(1.0, 0.9)),
    dict(betas=(0.9, -0.1)), dict(weight_decay=-0.1),
])
def test_invalid_arguments_are_worded_as_torch_optim_words_them(kwargs):
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError) as adam_error:
        torch.optim.Adam(params, **kwargs)
    with pytest.raises(ValueError) as adaml_error:
        AdamL(params, **kwargs)
    assert str(adaml_error.value).startswith(str(adam_error.value))
