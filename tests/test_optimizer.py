"""AdamL as a torch.optim optimizer: skips, closures, checkpoints, bad input, edge cases."""

import io
import math

import pytest
import torch

import adaml_kernels
from adaml_kernels import AdamL
from parity import cpu_testable_backends

BACKENDS = cpu_testable_backends()
SIZES = [(3, 5), (7,), (1,), (2049,), (4, 1, 3)]


def make_params(device="cpu", dtype=torch.float32, seed=0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in sizes]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)


def snapshot(opt, params):
    """Bitwise copies of everything a step may change (the skip count aside: the tests that
    skip a step check it on its own)."""
    return (
        [p.detach().clone() for p in params],
        {i: {k: v.clone() for k, v in opt.state[p].items() if k != "skipped_steps"}
         for i, p in enumerate(params) if p in opt.state},
    )


def assert_bitwise_equal(a, b):
    params_a, state_a = a
    params_b, state_b = b
    for x, y in zip(params_a, params_b):  # compared as bytes: NaN payloads and -0.0 count
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        for k in state_a[i]:
            x, y = state_a[i][k], state_b[i][k]
            assert torch.equal(x, y) or (x.isnan().all() and y.isnan().all()), (i, k)


def run_steps(opt, params, losses, first_seed=0):
    for i, loss in enumerate(losses):
        set_grads(params, first_seed + i)
        opt.step(loss)


# ------------------------------------------------------------------------------ skipping


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("as_tensor", [True, False])
def test_non_finite_loss_changes_nothing(backend, device, bad, as_tensor):
    params = make_params(device)
    opt = AdamL(params, lr=0.1, normalize_loss=True, weight_decay=0.1, backend=backend)
    run_steps(opt, params, [torch.tensor(2.0, device=device), 1.5])
    set_grads(params, 7)
    before = snapshot(opt, params)
    opt.step(torch.tensor(bad, device=device) if as_tensor else bad)
    assert_bitwise_equal(before, snapshot(opt, params))
    assert opt.skipped_steps == 1
    opt.step(1.0)  # and the next good step is taken
    assert all(float(opt.state[p]["step"]) == 3 for p in params)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_skipped_first_step_creates_no_progress(backend, device):
    params = make_params(device)
    opt = AdamL(params, lr=0.1, normalize_loss=True, backend=backend)
    set_grads(params, 0)
    opt.step(torch.tensor(math.nan, device=device))
    assert all(float(opt.state[p]["step"]) == 0 for p in params)
    assert all(math.isnan(float(opt.state[p]["initial_loss"])) for p in params)
    assert all(torch.count_nonzero(opt.state[p]["exp_avg"]) == 0 for p in params)
    opt.step(torch.tensor(3.0, device=device))
    assert all(float(opt.state[p]["initial_loss"]) == 3.0 for p in params)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grad_scaler_found_inf_skips_and_scale_is_divided_out(backend, device):
    params = make_params(device)
    reference = [p.detach().clone().requires_grad_() for p in params]
    opt = AdamL(params, lr=0.1, backend=backend)
    opt_ref = AdamL(reference, lr=0.1, backend=backend)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)

    def scaled_backward(seed, poison=False):
        # sum(p * c) has gradient c: backward of the scaled loss leaves c * scale in .grad
        set_grads(reference, seed)
        targets = [r.grad.clone() for r in reference]
        if poison:
            targets[0][0] = math.inf
        for p in params:
            p.grad = None
        scaler.scale(sum((p * c).sum() for p, c in zip(params, targets))).backward()

    for step in range(3):
        set_grads(reference, step)
        opt_ref.step(2.0)
        scaled_backward(step)
        scaler.step(opt, torch.tensor(2.0, device=device))
        scaler.update()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    # An inf in a gradient: GradScaler reports found_inf and the step changes nothing.
    scaled_backward(9, poison=True)
    before = snapshot(opt, params)
    scaler.step(opt, torch.tensor(2.0, device=device))
    scaler.update()
    assert_bitwise_equal(before, snapshot(opt, params))
    assert opt.skipped_steps == 1


# ------------------------------------------------------------------------ calling forms


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_closure_gives_bitwise_the_same_result(backend, device):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, device=device), torch.randn(16, 2, device=device)
    models = [torch.nn.Linear(4, 2).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [AdamL(m.parameters(), lr=0.05, backend=backend) for m in models]
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(models[0](x), y)
        loss.backward()
        opts[0].step(loss)
        opts[0].zero_grad()

        def closure():
            opts[1].zero_grad()
            loss = torch.nn.functional.mse_loss(models[1](x), y)
            loss.backward()
            return loss

        returned = opts[1].step(closure)
        assert torch.is_tensor(returned) and returned.requires_grad
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_missing_loss_says_how_to_call_step():
    params = make_params()
    opt = AdamL(params)
    set_grads(params, 0)
    before = snapshot(opt, params)
    with pytest.raises(TypeError, match=r"step\(loss\).*step\(closure\)"):
        opt.step()
    assert_bitwise_equal(before, snapshot(opt, params))
    assert not opt.state


def test_loss_is_never_read_on_the_host():
    class NoHostReads(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            host_reads = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy",
                          "__format__")
            if name in host_reads:
                raise AssertionError(f"the loss was read on the host through {name}")
            return super().__torch_function__(func, types, args, kwargs or {})

    for backend, device in BACKENDS:
        params = make_params(device)
        opt = AdamL(params, lr=0.1, normalize_loss=True, backend=backend)
        for step in range(2):
            set_grads(params, step)
            opt.step(torch.tensor(1.5, device=device).as_subclass(NoHostReads))
        assert float(opt.state[params[0]]["step"]) == 2


# ------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_save_and_load_continues_bitwise(backend, device):
    losses = [2.0, 1.7, torch.tensor(1.5, device=device), 1.2, 1.1, 0.9]
    kwargs = dict(lr=0.05, normalize_loss=True, weight_decay=0.01, backend=backend)
    params = make_params(device)
    opt = AdamL(params, **kwargs)
    run_steps(opt, params, losses)

    resumed = make_params(device)
    opt2 = AdamL(resumed, **kwargs)
    run_steps(opt2, resumed, losses[:3])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in resumed], "opt": opt2.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = [p.clone().requires_grad_() for p in saved["params"]]
    opt3 = AdamL(fresh, **kwargs)
    opt3.load_state_dict(saved["opt"])
    run_steps(opt3, fresh, losses[3:], first_seed=3)
    assert_bitwise_equal(snapshot(opt, params), snapshot(opt3, fresh))


def test_state_dict_holds_the_state_tensors_as_torch_adam_does():
    # torch.optim.Adam's state_dict() copies nothing: a copy of the moments would be a second
    # state-size of memory at every checkpoint.
    params = make_params(sizes=[(1000,), (10,), (3, 3)] * 20)
    opt = AdamL(params)
    run_steps(opt, params, [1.0])
    sd = opt.state_dict()
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert sd["state"][i][key] is opt.state[p][key]
    adam = torch.optim.Adam(params, fused=True)
    run_steps(adam, params, [None])
    assert adam.state_dict()["state"][0]["exp_avg"] is adam.state[params[0]]["exp_avg"]


def test_saved_state_is_about_the_size_of_its_tensors():
    # The state tensors are views of flat buffers; torch.save writes each buffer once.
    params = make_params(sizes=[(1000,), (10,), (3, 3)] * 20)
    opt = AdamL(params)
    run_steps(opt, params, [1.0])
    everything = io.BytesIO()
    sd = opt.state_dict()
    torch.save(sd, everything)
    tensors = [v for st in sd["state"].values() for v in st.values()
               if isinstance(v, torch.Tensor)]
    tensor_bytes = sum(v.nbytes for v in tensors)
    # torch.save's zip container costs a few hundred bytes per tensor record (which also
    # covers the buffers' 64-byte alignment and the 4 KiB gap between the moment rows)
    assert everything.getbuffer().nbytes < tensor_bytes + 512 * len(tensors) + 4096
    everything.seek(0)
    loaded = torch.load(everything, weights_only=True)
    opt2 = AdamL([p.detach().clone().requires_grad_() for p in params])
    opt2.load_state_dict(loaded)
    for i, p in enumerate(opt2.param_groups[0]["params"]):
        assert torch.equal(opt2.state[p]["exp_avg_sq"], opt.state[params[i]]["exp_avg_sq"])


def test_adam_state_dict_round_trips():
    params = make_params()
    adam = torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.9), eps=1e-6)
    run_steps(adam, params, [None, None])
    adaml = AdamL(params, lr=0.01, betas=(0.8, 0.9), eps=1e-6)
    adaml.load_state_dict(adam.state_dict())
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(adaml.state[p][key], adam.state[p][key])
    run_steps(adaml, params, [1.0], first_seed=2)
    assert all(float(adaml.state[p]["step"]) == 3 for p in params)

    adam2 = torch.optim.Adam(params, lr=0.01)
    adam2.load_state_dict(adaml.state_dict())
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(adam2.state[p][key], adaml.state[p][key])
    run_steps(adam2, params, [None], first_seed=3)
    assert all(float(adam2.state[p]["step"]) == 4 for p in params)


def test_half_precision_moments_stay_float32_through_a_checkpoint():
    params = make_params(dtype=torch.bfloat16)
    opt = AdamL(params, backend="reference")
    run_steps(opt, params, [1.0, 2.0])
    sd = opt.state_dict()
    opt2 = AdamL(params, backend="reference")
    opt2.load_state_dict(sd)
    for i, p in enumerate(params):
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["exp_avg_sq"], sd["state"][i]["exp_avg_sq"])


# ---------------------------------------------------------------------------- bad input

INVALID = [
    ("lr", dict(lr=0.0)), ("lr", dict(lr=-1.0)), ("lr", dict(lr=math.nan)),
    ("betas", dict(betas=(1.0, 0.9))), ("betas", dict(betas=(0.9, -0.1))),
    ("betas", dict(betas=(0.9,))), ("eps", dict(eps=-1e-8)), ("gamma", dict(gamma=0.0)),
    ("phi", dict(phi=-0.5)), ("loss_offset", dict(loss_offset=math.inf)),
    ("weight_decay", dict(weight_decay=-0.1)), ("normalize_loss", dict(normalize_loss=1)),
    ("decoupled_weight_decay", dict(decoupled_weight_decay="yes")),
    ("maximize", dict(maximize=None)), ("backend", dict(backend="fastest")),
]


@pytest.mark.parametrize("name,kwargs", INVALID,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(INVALID)])
def test_invalid_hyperparameters_raise_naming_them(name, kwargs):
    with pytest.raises(ValueError, match=name):
        AdamL(make_params(), **kwargs)
    if name == "backend":
        return
    opt = AdamL(make_params())
    groups = list(opt.param_groups)
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": make_params(seed=1), **kwargs})
    assert opt.param_groups == groups


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input_raises_before_anything_changes(backend, device):
    params = make_params(device)
    opt = AdamL(params, backend=backend)
    run_steps(opt, params, [1.0])
    set_grads(params, 5)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="one element"):
        opt.step(torch.tensor([1.0, 2.0], device=device))
    with pytest.raises(TypeError, match="loss"):
        opt.step("1.0")
    params[-1].grad = params[-1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(1.0)
    assert_bitwise_equal(before, snapshot(opt, params))


def test_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match="complex"):
        AdamL([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    opt = AdamL(make_params())
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64)]})
    assert len(opt.param_groups) == 1


def test_unavailable_backend_raises_instead_of_falling_back():
    unavailable = adaml_kernels.unavailable_backends("cpu")
    assert "cuda" in unavailable  # cuda never runs CPU tensors
    params = make_params()
    opt = AdamL(params, backend="cuda")
    set_grads(params, 0)
    with pytest.raises(RuntimeError, match="not available"):
        opt.step(1.0)
    assert not opt.state


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_parameters_without_gradients_are_left_alone(backend, device):
    params = make_params(device)
    opt = AdamL(params, lr=0.1, backend=backend)
    run_steps(opt, params, [1.0, 0.8])
    frozen = params[1]
    frozen_before = frozen.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[frozen].items()}
    never = torch.randn(4, device=device, requires_grad=True)
    opt.add_param_group({"params": [never]})
    for step in range(3):
        set_grads(params, 10 + step)
        frozen.grad = None
        opt.step(0.7)
    assert torch.equal(frozen, frozen_before)
    for k, v in state_before.items():
        now = opt.state[frozen][k]
        assert torch.equal(now, v) or (v.isnan().all() and now.isnan().all())
    assert never not in opt.state
    assert float(opt.state[params[0]]["step"]) == 5
    assert float(opt.state[frozen]["step"]) == 2


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_parameters_work(backend, device):
    params = make_params(device, sizes=[(0,), (3,), (0, 4)])
    opt = AdamL(params, lr=0.1, normalize_loss=True, backend=backend)
    run_steps(opt, params, [1.0, 2.0])
    assert opt.state[params[0]]["exp_avg"].shape == (0,)
    assert all(float(opt.state[p]["step"]) == 2 for p in params)
    assert all(float(opt.state[p]["initial_loss"]) == 1.0 for p in params)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_moments_are_views_of_one_flat_buffer_and_params_stay_put(backend, device):
    params = make_params(device)
    addresses = [p.data_ptr() for p in params]
    opt = AdamL(params, backend=backend)
    run_steps(opt, params, [1.0, 0.5])
    storages = {opt.state[p][k].untyped_storage().data_ptr() for p in params
                for k in ("exp_avg", "exp_avg_sq")}
    assert len(storages) == 1
    assert [p.data_ptr() for p in params] == addresses


def test_pointer_table_is_rebuilt_only_when_storage_moves(monkeypatch):
    from adaml_kernels import buckets

    builds = []
    original = buckets.build_table
    monkeypatch.setattr(buckets, "build_table", lambda *a: builds.append(1) or original(*a))
    params = make_params()
    opt = AdamL(params, backend="triton")
    for p in params:
        p.grad = torch.zeros_like(p)
    for step in range(3):
        for p in params:
            p.grad.normal_()  # same storage: the table stays
        opt.step(1.0)
    assert len(builds) == 1
    moved = params[2].detach().clone()
    params[2].data = moved  # the parameter's storage moves: the table must follow it
    before = moved.clone()
    opt.step(1.0)
    assert len(builds) == 2
    assert not torch.any(moved == before)  # the update landed in the new storage


def test_param_groups_and_lr_scheduler():
    a, b = make_params(seed=1, sizes=[(5,)]), make_params(seed=2, sizes=[(5,)])
    opt = AdamL([{"params": a}, {"params": b, "lr": 0.0 + 1e-9, "gamma": 2.0}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    b_before = b[0].detach().clone()
    for step in range(3):
        set_grads(a + b, step)
        opt.step(1.0)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert opt.param_groups[1]["gamma"] == 2.0
    torch.testing.assert_close(b[0].detach(), b_before, atol=1e-7, rtol=0)
    assert not torch.allclose(a[0].detach(), make_params(seed=1, sizes=[(5,)])[0])
    opt.zero_grad()
    assert all(p.grad is None for p in a + b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gamma_one_and_unit_loss_is_eadam(backend, device):
    # SPEC.md: gamma = 1 and loss - f* = 1 on every step gives EAdam's w = b2 w + (1-b2) g^2 + eps
    params = make_params(device, sizes=[(300,)])
    b2, eps = 0.99, 1e-3
    opt = AdamL(params, betas=(0.9, b2), eps=eps, gamma=1.0, phi=2.5, loss_offset=0.5,
                backend=backend)
    w = torch.zeros(300, dtype=torch.float64)
    for step in range(5):
        set_grads(params, step)
        w = b2 * w + (1 - b2) * params[0].grad.double().cpu() ** 2 + eps
        opt.step(1.5)
    torch.testing.assert_close(opt.state[params[0]]["exp_avg_sq"].double().cpu(), w,
                               rtol=1e-6, atol=0)


def test_available_backends_on_this_machine():
    names = adaml_kernels.available_backends()
    assert "reference" in names
    assert "reference" in adaml_kernels.available_backends("cpu")
    if torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1":
        assert "triton" in names
    for name, reason in adaml_kernels.unavailable_backends().items():
        assert name not in names and reason


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inside_a_compiled_training_step(backend, device):
    torch.manual_seed(0)
    x, y = torch.randn(8, 4, device=device), torch.randn(8, 1, device=device)
    models = [torch.nn.Linear(4, 1).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [AdamL(m.parameters(), lr=0.05, backend=backend) for m in models]

    def train_step(model, opt):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss)
        opt.zero_grad()
        return loss

    compiled = torch.compile(train_step, backend="eager")
    for _ in range(3):
        train_step(models[0], opts[0])
        compiled(models[1], opts[1])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_new_gradient_tensors_only_repoint_the_table(monkeypatch):
    # zero_grad(set_to_none=True) then backward: the gradients move, the parameters do not.
    from adaml_kernels import buckets

    builds = []
    original = buckets.build_table
    monkeypatch.setattr(buckets, "build_table", lambda *a: builds.append(1) or original(*a))
    params = make_params()
    reference = [p.detach().clone().requires_grad_() for p in params]
    opt = AdamL(params, lr=0.1, backend="triton")
    opt_ref = AdamL(reference, lr=0.1, backend="reference")
    for step in range(3):
        set_grads(params, step)  # fresh tensors every step
        set_grads(reference, step)
        opt.step(1.0)
        opt_ref.step(1.0)
    assert len(builds) == 1
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_channels_last_and_transposed_parameters(backend, device):
    # Dense but not contiguous: the moments take the parameter's strides, element for element.
    conv = torch.randn(4, 3, 2, 2, device=device).to(memory_format=torch.channels_last)
    params = [conv.requires_grad_(), torch.randn(5, 3, device=device).t().requires_grad_()]
    reference = [p.detach().clone(memory_format=torch.preserve_format).requires_grad_()
                 for p in params]
    opt = AdamL(params, lr=0.1, backend=backend)
    opt_ref = AdamL(reference, lr=0.1, backend="reference")
    for step in range(3):
        for ps in (params, reference):
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = _like(p, g)
        opt.step(1.0)
        opt_ref.step(1.0)
    for p, r in zip(params, reference):
        assert opt.state[p]["exp_avg"].stride() == p.stride()
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


def _like(p, generator):
    """A random gradient with p's shape and strides."""
    values = torch.randn(p.shape, generator=generator).to(p.device)
    return torch.empty_like(p).copy_(values)


def test_zero_grad_forgets_the_losses_of_a_step_grad_scaler_skipped():
    # amp_scaling=False: GradScaler skips a step with inf gradients without calling AdamL, so the
    # loss registered for it must not reach the next step (zero_grad drops it).
    w = torch.nn.Parameter(torch.ones(3))
    opt = AdamL([w], lr=0.1, amp_scaling=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    seen, registered = [], []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(float(o.pending_loss)))
    for poison in (False, True, False):
        opt.zero_grad()
        loss = (w * w).sum()
        scaler.scale(loss * (math.inf if poison else 1.0)).backward()
        opt.add_loss(loss)
        registered.append(float(loss))
        scaler.step(opt)
        scaler.update()
    assert seen == [registered[0], registered[2]]  # the skipped step's loss is not added
