"""Gradient release (AdamL(..., gradient_release=True), docs/gradient_release.md): the buckets
step during backward, and parameters, state and state_dict() are bit for bit the ordinary
step's (SPEC.md, Gradient release), in every precision mode, on the cpu and reference backends.

Every comparison is torch.equal on every tensor, against the same model trained with the
ordinary step (add_loss after backward, then step()).
"""

import copy
import math

import pytest
import torch

from adaml_kernels import AdamL, available_backends

BACKENDS = ["reference"] + [b for b in ("cpu",) if b in available_backends("cpu")]
BF16 = torch.bfloat16
STEPS = 4
CAP_MB = 0.02  # about 20 kB of gradient a bucket: several buckets in the model below

# (parameter dtype, AdamL options)
MODES = {
    "fp32": (torch.float32, {}),
    "bf16": (BF16, {}),
    "bf16_master": (BF16, dict(master_weights=True)),
    "bf16_sr": (BF16, dict(stochastic_rounding=True, seed=5)),
    "bf16_master_sr": (BF16, dict(master_weights=True, stochastic_rounding=True, seed=6)),
    "bf16_moments": (torch.float32, dict(state_dtype=BF16)),
    "8bit_moments": (torch.float32, dict(state_dtype=torch.uint8)),
}

# Every term of the update shows: f_1 (normalize_loss), L2 decay, eps*l, gamma and phi.
HYPER = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-3, gamma=0.6, phi=1.3, loss_offset=0.05,
             normalize_loss=True)


class Net(torch.nn.Module):
    """Four layers (weights of 6144 and 9216 elements: 8-bit moments are really used), an
    optional branch that gets gradients only when used, and a parameter that never does."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        sizes = [(64, 96), (96, 96), (96, 48), (48, 8)]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in sizes)
        self.branch = torch.nn.Linear(96, 96)
        self.unused = torch.nn.Parameter(torch.zeros(7))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.to(dtype)

    def forward(self, x, use_branch=False):
        x = torch.tanh(self.layers[0](x))
        if use_branch:
            x = x + torch.tanh(self.branch(x))
        for layer in self.layers[1:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def batch(step, dtype, micro=0):
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(16, 64, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype)


def loss_of(model, step, dtype, micro=0, use_branch=False):
    x, y = batch(step, dtype, micro)
    return torch.nn.functional.mse_loss(model(x, use_branch).float(), y.float())


def groups(model, **extra):
    """Two groups: weights, and biases with their own lr and decay (the buckets are cut per
    group)."""
    named = list(model.named_parameters())
    weights = [p for n, p in named if not n.endswith("bias")]
    biases = [p for n, p in named if n.endswith("bias")]
    return [dict(params=weights), dict(params=biases, lr=3e-3, weight_decay=0.1)]


def pair(backend, dtype=torch.float32, **options):
    """(ordinary model, its AdamL), (released model, its AdamL), alike."""
    ordinary, released = Net(dtype), Net(dtype)
    opt = AdamL(groups(ordinary), backend=backend, **HYPER, **options)
    ropt = AdamL(groups(released), backend=backend, gradient_release=True, bucket_cap_mb=CAP_MB,
                 **HYPER, **options)
    return (ordinary, opt), (released, ropt)


def ordinary_step(model, opt, step, dtype, micro_batches=1, use_branch=False, loss_scale=1.0):
    for micro in range(micro_batches):
        loss = loss_of(model, step, dtype, micro, use_branch) * loss_scale
        loss.backward()
        opt.add_loss(loss)
    opt.step()
    opt.zero_grad()


def released_step(model, opt, step, dtype, micro_batches=1, use_branch=False, loss_scale=1.0):
    with opt.no_release():
        for micro in range(micro_batches - 1):
            loss = loss_of(model, step, dtype, micro, use_branch) * loss_scale
            opt.add_loss(loss)
            loss.backward()
    loss = loss_of(model, step, dtype, micro_batches - 1, use_branch) * loss_scale
    opt.add_loss(loss)
    loss.backward()
    assert all(p.grad is None for p in model.parameters()), "a released gradient is alive"
    opt.step()
    opt.zero_grad()


def assert_same_value(a, b, where):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(
            torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0))
            and torch.equal(a.isnan(), b.isnan())), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def assert_same_run(ordinary, opt, released, ropt):
    """Parameters, state (every tensor) and state_dict() bitwise alike."""
    for (name, p), q in zip(ordinary.named_parameters(), released.parameters()):
        assert_same_value(p.detach(), q.detach(), name)
        st, rst = opt.state.get(p, {}), ropt.state.get(q, {})
        assert st.keys() == rst.keys(), name
        for key in st:
            assert_same_value(st[key], rst[key], f"{name} {key}")
    sd, rsd = opt.state_dict(), ropt.state_dict()
    assert sd.keys() == rsd.keys()
    assert sd["state"].keys() == rsd["state"].keys()
    for i in sd["state"]:
        assert sd["state"][i].keys() == rsd["state"][i].keys()
        for key in sd["state"][i]:
            assert_same_value(sd["state"][i][key], rsd["state"][i][key], f"state {i} {key}")
    assert sd["param_groups"] == rsd["param_groups"]
    assert opt.skipped_steps == ropt.skipped_steps
    assert_same_value(opt.initial_loss, ropt.initial_loss, "f_1")


def trained_params_changed(model, before):
    return any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


# --------------------------------------------------------------------------------- the numbers

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_bitwise_the_ordinary_step_in_every_mode(backend, mode):
    dtype, options = MODES[mode]
    (ordinary, opt), (released, ropt) = pair(backend, dtype, **options)
    for step in range(STEPS):
        ordinary_step(ordinary, opt, step, dtype)
        released_step(released, ropt, step, dtype)
    assert_same_run(ordinary, opt, released, ropt)
    # several buckets, each stepped during backward (the test can tell a wrong one apart)
    assert len(ropt.engine.release.buckets) >= 5
    assert ropt.state[released.layers[0].weight]["step"].item() == STEPS
    assert trained_params_changed(released, [p.detach() for p in Net(dtype).parameters()])
    if mode == "8bit_moments":
        assert ropt.state[released.layers[1].weight]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_different_loss_gives_different_numbers(backend):
    # The comparison can fail: the released run with another loss differs from the ordinary one.
    (ordinary, opt), (released, ropt) = pair(backend)
    for step in range(2):
        ordinary_step(ordinary, opt, step, torch.float32)
        released_step(released, ropt, step, torch.float32, loss_scale=1.5)
    with pytest.raises(AssertionError):
        assert_same_run(ordinary, opt, released, ropt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_freed_as_their_bucket_steps(backend):
    _, (model, opt) = pair(backend)
    last = model.layers[-1].weight
    first = model.layers[0].weight
    before = last.detach().clone()
    seen = {}

    def during_backward(grad):  # the gradient of layer 0's output: layers 1-3 are done
        seen["last_grad"] = last.grad
        seen["last_changed"] = not torch.equal(last.detach(), before)
        seen["first_grad"] = first.grad
        return grad

    x, y = batch(0, torch.float32)
    h = torch.tanh(model.layers[0](x))
    h.register_hook(during_backward)
    for layer in model.layers[1:-1]:
        h = torch.tanh(layer(h))
    loss = torch.nn.functional.mse_loss(model.layers[-1](h), y)
    opt.add_loss(loss)
    loss.backward()
    assert seen == {"last_grad": None, "last_changed": True, "first_grad": None}
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert opt.state[first]["step"].item() == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_loss_skips_bitwise(backend, bad):
    (ordinary, opt), (released, ropt) = pair(backend)
    for step in range(2):
        ordinary_step(ordinary, opt, step, torch.float32)
        released_step(released, ropt, step, torch.float32)
    params = [p.detach().clone() for p in released.parameters()]
    state = copy.deepcopy(ropt.state_dict())
    ordinary_step(ordinary, opt, 2, torch.float32, loss_scale=bad)
    released_step(released, ropt, 2, torch.float32, loss_scale=bad)
    assert ropt.skipped_steps == 1 and not ropt.last_step_taken
    for p, before in zip(released.parameters(), params):
        assert torch.equal(p.detach(), before)
    after = ropt.state_dict()
    for i, st in state["state"].items():
        for key, value in st.items():
            if key != "skipped_steps":
                assert_same_value(value, after["state"][i][key], f"{i} {key}")
    assert_same_run(ordinary, opt, released, ropt)
    ordinary_step(ordinary, opt, 3, torch.float32)
    released_step(released, ropt, 3, torch.float32)
    assert_same_run(ordinary, opt, released, ropt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nonfinite_first_loss_leaves_f1_unset(backend):
    (ordinary, opt), (released, ropt) = pair(backend)
    ordinary_step(ordinary, opt, 0, torch.float32, loss_scale=math.nan)
    released_step(released, ropt, 0, torch.float32, loss_scale=math.nan)
    assert math.isnan(ropt.initial_loss.item())
    for step in range(1, 3):
        ordinary_step(ordinary, opt, step, torch.float32)
        released_step(released, ropt, step, torch.float32)
    assert_same_run(ordinary, opt, released, ropt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backward_without_a_loss_raises_before_anything_changes(backend):
    (ordinary, opt), (released, ropt) = pair(backend)
    for first_step in (True, False):
        params = [p.detach().clone() for p in released.parameters()]
        state = copy.deepcopy(ropt.state_dict())
        loss = loss_of(released, 0, torch.float32)
        with pytest.raises(RuntimeError, match=r"add_loss\(loss\) before loss.backward"):
            loss.backward()
        for p, before in zip(released.parameters(), params):
            assert torch.equal(p.detach(), before)
        assert_same_value(len(ropt.state_dict()["state"]), len(state["state"]), "entries")
        if not first_step:
            for i, st in state["state"].items():
                for key, value in st.items():
                    assert_same_value(value, ropt.state_dict()["state"][i][key], f"{i} {key}")
        ropt.zero_grad()  # the failed backward's gradients are dropped; training goes on
        ordinary_step(ordinary, opt, 1, torch.float32)
        released_step(released, ropt, 1, torch.float32)
        assert_same_run(ordinary, opt, released, ropt)


# ------------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fp32", "bf16_master_sr", "8bit_moments"])
def test_accumulation_equals_the_ordinary_step_with_the_summed_loss(backend, mode):
    dtype, options = MODES[mode]
    (ordinary, opt), (released, ropt) = pair(backend, dtype, **options)
    for step in range(3):
        ordinary_step(ordinary, opt, step, dtype, micro_batches=3)
        released_step(released, ropt, step, dtype, micro_batches=3)
    assert_same_run(ordinary, opt, released, ropt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_release_keeps_every_gradient_and_sums_the_losses(backend):
    _, (model, opt) = pair(backend)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    with opt.no_release():
        for micro in range(2):
            loss = loss_of(model, 0, torch.float32, micro)
            opt.add_loss(loss)
            loss.backward()
            losses.append(loss.detach().double())
    assert all(p.grad is not None for layer in model.layers for p in layer.parameters())
    assert not trained_params_changed(model, before)
    assert torch.equal(opt.pending_loss, losses[0] + losses[1])
    opt.step()  # the pending buckets step at step(), with the summed loss
    assert trained_params_changed(model, before)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------- which parameters step

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fp32", "bf16_sr", "8bit_moments"])
def test_late_parameters_and_parameters_without_gradients(backend, mode):
    dtype, options = MODES[mode]
    (ordinary, opt), (released, ropt) = pair(backend, dtype, **options)
    for model in (ordinary, released):  # frozen until step 2: it has no hook
        model.layers[1].bias.requires_grad_(False)
    for step in range(5):
        use_branch = step in (1, 3, 4)  # first gradient at step 1, none at step 2
        if step == 2:
            for model in (ordinary, released):
                model.layers[1].bias.requires_grad_(True)
        ordinary_step(ordinary, opt, step, dtype, use_branch=use_branch)
        released_step(released, ropt, step, dtype, use_branch=use_branch)
        assert_same_run(ordinary, opt, released, ropt)
    assert released.unused not in ropt.state or not ropt.state[released.unused]
    assert ropt.state[released.branch.weight]["step"].item() == 3
    assert ropt.state[released.layers[1].bias]["step"].item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_set_by_hand_step_in_step(backend):
    (ordinary, opt), (released, ropt) = pair(backend)
    for step in range(3):
        for model, o in ((ordinary, opt), (released, ropt)):
            g = torch.Generator().manual_seed(step)
            for p in model.layers.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            o.add_loss(0.5 + step)
            o.step()
            o.zero_grad()
    assert_same_run(ordinary, opt, released, ropt)


# --------------------------------------------------------------------------- state round trip

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fp32", "bf16_master_sr", "8bit_moments"])
def test_a_state_dict_round_trip_mid_run_continues_bitwise(backend, mode):
    dtype, options = MODES[mode]
    (ordinary, opt), (released, ropt) = pair(backend, dtype, **options)
    for step in range(2):
        ordinary_step(ordinary, opt, step, dtype)
        released_step(released, ropt, step, dtype)
    saved_model = copy.deepcopy(released.state_dict())
    saved_opt = copy.deepcopy(ropt.state_dict())
    resumed = Net(dtype)
    resumed.load_state_dict(saved_model)
    ropt2 = AdamL(groups(resumed), backend=backend, gradient_release=True,
                  bucket_cap_mb=CAP_MB, **HYPER, **options)
    ropt2.load_state_dict(saved_opt)
    ropt.load_state_dict(saved_opt)  # into the running optimizer too
    for step in range(2, 4):
        ordinary_step(ordinary, opt, step, dtype)
        released_step(resumed, ropt2, step, dtype)
        released_step(released, ropt, step, dtype)
    assert_same_run(ordinary, opt, resumed, ropt2)
    assert_same_run(ordinary, opt, released, ropt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deepcopy_releases_its_own_parameters(backend):
    (ordinary, opt), (released, ropt) = pair(backend)
    ordinary_step(ordinary, opt, 0, torch.float32)
    released_step(released, ropt, 0, torch.float32)
    both = copy.deepcopy({"model": released, "opt": ropt})
    model2, ropt2 = both["model"], both["opt"]
    assert ropt2.gradient_release and ropt2.bucket_cap_mb == CAP_MB
    before = [p.detach().clone() for p in released.parameters()]
    ordinary_step(ordinary, opt, 1, torch.float32)
    released_step(model2, ropt2, 1, torch.float32)
    assert not trained_params_changed(released, before)  # the original is untouched
    assert_same_run(ordinary, opt, model2, ropt2)


# --------------------------------------------------------------------------------- bucket size

def test_bucket_cap_sizes_the_buckets():
    model = Net()
    opt = AdamL(model.parameters(), gradient_release=True, bucket_cap_mb=0.03)
    assert opt.bucket_cap_mb == 0.03
    opt.add_loss(loss_of(model, 0, torch.float32))
    loss_of(model, 0, torch.float32).backward()
    buckets = opt.engine.release.buckets
    cap = 0.03 * (1 << 20)
    for bucket in buckets:
        size = sum(p.numel() * p.element_size() for p in bucket.params)
        assert size <= cap or len(bucket.params) == 1
    assert len(buckets) >= 4
    one = AdamL(Net().parameters(), gradient_release=True)
    assert one.bucket_cap_mb == 25.0
    assert AdamL(Net().parameters()).bucket_cap_mb is None


# ------------------------------------------------------------------------- refused combinations

def released_opt(**kwargs):
    model = Net()
    return model, AdamL(model.parameters(), gradient_release=True, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bucket_cap_mb=1.0), "needs gradient_release=True"),
    (dict(gradient_release=True, bucket_cap_mb=0), "Invalid bucket_cap_mb"),
    (dict(gradient_release=True, bucket_cap_mb=math.inf), "Invalid bucket_cap_mb"),
    (dict(gradient_release=True, bucket_cap_mb="25"), "Invalid bucket_cap_mb"),
    (dict(gradient_release=1), "Invalid gradient_release"),
    (dict(gradient_release=True, amp_scaling=False), "amp_scaling=False"),
])
def test_bad_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamL(Net().parameters(), **kwargs)


def test_amp_scaling_cannot_be_turned_off_later():
    _, opt = released_opt()
    with pytest.raises(ValueError, match="amp_scaling=False"):
        opt.amp_scaling = False
    with pytest.raises(RuntimeError, match="gradient_release=True"):
        AdamL(Net().parameters()).no_release()


def test_closures_and_step_losses_are_refused():
    model, opt = released_opt()
    loss = loss_of(model, 0, torch.float32)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: loss)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure=lambda: loss)
    with pytest.raises(RuntimeError, match="before loss.backward"):
        opt.step(loss)
    assert not opt.state or not any(opt.state.values())


def test_grad_scaler_is_refused():
    model, opt = released_opt()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    loss = loss_of(model, 0, torch.float32)
    opt.add_loss(loss)
    scaler.scale(loss).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


def test_a_second_backward_in_one_step_is_refused():
    model, opt = released_opt(bucket_cap_mb=CAP_MB)
    loss = loss_of(model, 0, torch.float32)
    opt.add_loss(loss)
    loss.backward()
    with pytest.raises(RuntimeError, match="after the buckets|already stepped"):
        opt.add_loss(loss_of(model, 0, torch.float32, 1))
    with pytest.raises(RuntimeError, match="opt.step\\(\\) to finish"):
        opt.zero_grad()
    loss2 = loss_of(model, 0, torch.float32, 1)
    with pytest.raises(RuntimeError, match="second gradient in one step"):
        loss2.backward()
    opt.step()  # finishes the step the first backward made
    opt.zero_grad()
    assert opt.state[model.layers[0].weight]["step"].item() == 1


def test_unreduced_gradients_under_torch_distributed_are_refused(monkeypatch):
    # (2 real ranks, DDP and FSDP2: tests/test_gradient_release_dp.py)
    import torch.distributed as dist

    model, opt = released_opt()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    loss = loss_of(model, 0, torch.float32)
    opt.add_loss(loss)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="torch.distributed with 2 ranks.*before it is reduced"):
        loss.backward()
    assert not trained_params_changed(model, before)
