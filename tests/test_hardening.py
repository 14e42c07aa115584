"""Paths that change state: late parameters, parameters changed in place, steps that cannot be
taken, saturation, backend choice per tensor. Each test runs on every backend that runs here."""

import pytest
import torch

import adaml_kernels
from adaml_kernels import AdamL, _extension, backends
from parity import cpu_testable_backends

BACKENDS = cpu_testable_backends()
FUSED = [(b, d) for b, d in BACKENDS if b != "reference"]


def snapshot(opt, params):
    """Bitwise copies of everything a step may change."""
    state = {i: {k: v.clone() for k, v in opt.state[p].items()}
             for i, p in enumerate(params) if p in opt.state}
    skipped = None if opt.engine.skipped is None else opt.engine.skipped.clone()
    return [p.detach().clone() for p in params], state, skipped


def assert_unchanged(before, after):
    (pa, sa, ka), (pb, sb, kb) = before, after
    for x, y in zip(pa, pb):
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]) or (sa[i][k].isnan().all()
                                                      and sb[i][k].isnan().all()), (i, k)
    assert (ka is None and kb is None) or torch.equal(ka, kb)


def grads_for(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in params]


# ------------------------------------------------------------------------------ one f_1


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_late_parameter_uses_the_optimizers_first_loss(backend, device):
    # Step 1 (loss 10): only a has a gradient. Step 2 (loss 5): both. SPEC: f_1 = 10 for both,
    # so b's first update equals that of a twin c stepped at loss 5 with f_1 = 10.
    a, b = (torch.ones(4, device=device, requires_grad=True) for _ in range(2))
    opt = AdamL([a, b], lr=0.1, normalize_loss=True, phi=2.0, eps=0.0, backend=backend)
    a.grad = torch.full_like(a, 0.5)
    opt.step(10.0)
    a.grad, b.grad = torch.full_like(a, 0.5), torch.full_like(b, 0.5)
    opt.step(5.0)
    assert float(opt.state[a]["initial_loss"]) == float(opt.state[b]["initial_loss"]) == 10.0
    c = torch.ones(4, device=device, requires_grad=True)
    twin = AdamL([c], lr=0.1, normalize_loss=True, phi=2.0, eps=0.0, backend=backend)
    twin.engine.initial_loss = torch.tensor(10.0, dtype=torch.float64, device=device)
    twin.state[c]["initial_loss"] = twin.engine.initial_loss
    c.grad = torch.full_like(c, 0.5)
    twin.step(5.0)
    assert torch.equal(opt.state[b]["exp_avg_sq"], twin.state[c]["exp_avg_sq"])
    # With f_1 = 5 (b's own first loss) w would be 4 times larger (phi = 2).


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_first_loss_is_shared_by_groups_added_later_and_survives_a_checkpoint(backend, device):
    a = torch.ones(3, device=device, requires_grad=True)
    opt = AdamL([a], lr=0.1, normalize_loss=True, backend=backend)
    a.grad = torch.ones_like(a)
    opt.step(4.0)
    b = torch.ones(2, device=device, requires_grad=True)
    opt.add_param_group({"params": [b]})
    b.grad = torch.ones_like(b)
    opt.step(3.0)
    assert float(opt.state[b]["initial_loss"]) == 4.0
    sd = opt.state_dict()
    fresh = [torch.ones(3, device=device, requires_grad=True),
             torch.ones(2, device=device, requires_grad=True)]
    opt2 = AdamL([fresh[0]], lr=0.1, normalize_loss=True, backend=backend)
    opt2.add_param_group({"params": [fresh[1]]})
    opt2.load_state_dict(sd)
    assert float(opt2.initial_loss) == 4.0
    assert opt2.state[fresh[0]]["initial_loss"] is opt2.state[fresh[1]]["initial_loss"]


# --------------------------------------------------------------- parameters changed in place


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_memory_format_change_keeps_each_elements_moments(backend, device):
    # Element-wise update: a channels_last copy of the parameter must get bitwise the same
    # values, element for element, as the untouched twin.
    shape = (4, 3, 5, 6)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    p, twin = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt = AdamL([p], lr=0.05, backend=backend)
    opt_twin = AdamL([twin], lr=0.05, backend=backend)
    for step in range(4):
        if step == 2:
            p.data = p.data.to(memory_format=torch.channels_last)
        (g,) = grads_for([twin], step)
        twin.grad = g
        p.grad = g.clone(memory_format=torch.preserve_format).to(
            memory_format=torch.channels_last if step >= 2 else torch.contiguous_format)
        opt.step(1.5)
        opt_twin.step(1.5)
    assert p.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(p, twin)
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[p][key].stride() == p.stride()
        assert torch.equal(opt.state[p][key], opt_twin.state[twin][key])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_shrunk_parameter_raises_before_anything_changes(backend, device):
    p = torch.randn(4096, device=device, requires_grad=True)
    q = torch.randn(7, device=device, requires_grad=True)
    opt = AdamL([q, p], lr=0.05, backend=backend)
    for step in range(2):
        q.grad, p.grad = grads_for([q, p], step)
        opt.step(1.0)
    p.data = p.data[:2048]  # same address, half the elements
    q.grad, p.grad = grads_for([q, p], 5)
    before = snapshot(opt, [q, p])
    with pytest.raises(ValueError, match="changed in place"):
        opt.step(1.0)
    assert_unchanged(before, snapshot(opt, [q, p]))
    # Resetting its state is the way on: the next step starts p afresh.
    del opt.state[p]
    opt.step(1.0)
    assert float(opt.state[p]["step"]) == 1 and float(opt.state[q]["step"]) == 3
    assert opt.state[p]["exp_avg"].shape == (2048,)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_square_parameter_transposed_in_place_matches_the_reference(backend, device):
    # Same address, same shape, other strides: the moments must follow the logical elements.
    results = []
    for name in (backend, "reference"):
        p = torch.randn(64, 64, generator=torch.Generator().manual_seed(1)).to(device)
        p.requires_grad_()
        opt = AdamL([p], lr=0.05, backend=name)
        for step in range(4):
            if step == 2:
                p.data = p.data.t()
            (g,) = grads_for([p], step)
            p.grad = g if step < 2 else g.t().contiguous().t()
            opt.step(1.2)
        results.append((p.detach().clone(), opt.state[p]["exp_avg_sq"].clone()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_parameter_dtype_change_is_handled_or_refused_before_anything_changes(backend, device):
    p = torch.randn(10, device=device, requires_grad=True)
    opt = AdamL([p], lr=0.05, backend=backend)
    p.grad = torch.ones_like(p)
    opt.step(1.0)
    p.data = p.data.to(torch.bfloat16)
    p.grad = torch.ones_like(p)
    opt.step(1.0)  # every backend takes bf16; moments stay float32 and keep their values
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert float(opt.state[p]["step"]) == 2
    p.data = p.data.double()
    p.grad = torch.ones_like(p)
    before = snapshot(opt, [p])
    if backend in ("triton", "cuda"):
        with pytest.raises(ValueError, match="does not support torch.float64"):
            opt.step(1.0)
        assert_unchanged(before, snapshot(opt, [p]))
    else:
        opt.step(1.0)
        assert opt.state[p]["exp_avg"].dtype == torch.float64


# ---------------------------------------------------------------------------- atomic steps


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_bad_second_group_changes_nothing_in_the_first(backend, device):
    a = torch.randn(5, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    opt = AdamL([{"params": [a]}, {"params": [b]}], lr=0.1, normalize_loss=True,
                backend=backend)
    a.grad, b.grad = grads_for([a, b], 0)
    opt.step(2.0)
    whole = b.data
    for bad in ("sparse", "shrunk"):
        a.grad = grads_for([a], 1)[0]
        if bad == "sparse":
            b.grad = torch.ones(6, device=device).to_sparse()
        else:
            b.grad = None
            b.data = whole[:3]
            b.grad = torch.ones(3, device=device)
        before = snapshot(opt, [a, b])
        with pytest.raises((ValueError, RuntimeError)):
            opt.step(1.5)
        assert_unchanged(before, snapshot(opt, [a, b]))
        b.grad = None
        b.data = whole


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_first_step_that_fails_leaves_no_state_and_no_first_loss(backend, device):
    a = torch.randn(5, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    opt = AdamL([a, b], lr=0.1, normalize_loss=True, backend=backend)
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(2.0)
    assert not opt.state and opt.initial_loss is None and opt.skipped_steps == 0
    b.grad = torch.ones_like(b)
    opt.step(3.0)
    assert float(opt.state[a]["initial_loss"]) == 3.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_registered_losses_survive_a_step_that_raises(backend, device):
    p = torch.randn(5, device=device, requires_grad=True)
    opt = AdamL([p], lr=0.1, backend=backend)
    opt.add_loss(torch.tensor(1.5, device=device))
    p.grad = torch.ones_like(p).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    p.grad = torch.ones_like(p)
    assert opt.step() is not None  # the 1.5 registered before is still there


# --------------------------------------------------------------------- finite inputs, no NaN


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_phi_4_at_the_optimum_saturates_instead_of_nan(backend, device, normalize):
    # l = 1e-12, l^4 = 1e-48: (1 - b2) / l^4 = 1e45 > float32's range. Zero gradients must not
    # give 0 * inf, and w must stay finite (it saturates) so that it can decay again.
    g = torch.tensor([0.0, 1.0, -2.0, 1e-3, 1e-30, 0.0] * 400, device=device)
    p = torch.zeros_like(g, requires_grad=True)
    opt = AdamL([p], lr=1e-2, phi=4.0, loss_offset=1.0, normalize_loss=normalize,
                backend=backend)
    for loss in (2.0, 1.0, 1.0, 0.5, 1.5):  # at and below f* = 1, then above again
        p.grad = g.clone()
        opt.step(loss)
        w = opt.state[p]["exp_avg_sq"]
        assert torch.isfinite(w).all() and torch.isfinite(p).all()
    big = torch.finfo(torch.float32).max
    w = opt.state[p]["exp_avg_sq"]
    assert (w[g.abs() >= 1e-3] > big / 4).all()  # saturated, then decayed by b2 once
    assert (w[g == 0] < 1).all()  # untouched by the huge coefficient


# ------------------------------------------------------------------------- backend choice


def test_auto_trains_parameters_that_are_not_dense_on_the_reference_path():
    torch.manual_seed(0)
    base = torch.randn(6, 5, 2)
    strided = torch.nn.Parameter(base[..., 0])  # strides (10, 2): not dense
    dense = torch.nn.Parameter(torch.randn(7))
    twin = [torch.nn.Parameter(t.detach().clone()) for t in (strided, dense)]
    opt = AdamL([strided, dense], lr=0.05)
    ref = AdamL(twin, lr=0.05, backend="reference")
    for step in range(3):
        for o, ps in ((opt, [strided, dense]), (ref, twin)):
            o.zero_grad()
            loss = sum((q * q).sum() for q in ps)
            loss.backward()
            o.step(loss)
    plan = opt.describe()[0]
    on_ref = [b for b in plan if b["backend"] == "reference"]
    assert len(on_ref) == 1 and on_ref[0]["numel"] == strided.numel()
    torch.testing.assert_close(strided, twin[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dense, twin[1], rtol=1e-6, atol=1e-7)


STAGED_OPTIONS = [
    pytest.param(torch.float32, {}, id="float32"),
    pytest.param(torch.bfloat16, dict(master_weights=True, stochastic_rounding=True, seed=3),
                 id="bf16-master-sr"),
]


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype,options", STAGED_OPTIONS)
def test_a_backend_named_updates_a_parameter_that_is_not_dense_as_a_dense_one(
        backend, device, dtype, options, monkeypatch):
    # As torch's fused Adam does (torch's test_forloop_goes_right_direction, contiguous=False):
    # the parameter is staged through a dense copy, bitwise the update of a dense twin.
    torch.manual_seed(0)
    base = torch.randn(6, 5, 2, device=device).to(dtype)
    strided = torch.nn.Parameter(base[..., 0])  # strides (10, 2): not dense
    twin = torch.nn.Parameter(strided.detach().clone())
    other = [torch.nn.Parameter(torch.randn(7, device=device).to(dtype)) for _ in range(2)]
    opt = AdamL([strided, other[0]], backend=backend, lr=0.05, **options)
    ref = AdamL([twin, other[1]], backend=backend, lr=0.05, **options)
    other[1].data.copy_(other[0])
    versions = []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(6, 5, generator=g).to(device, dtype),
                 torch.randn(7, generator=g).to(device, dtype)]
        for o, ps in ((opt, [strided, other[0]]), (ref, [twin, other[1]])):
            for p, grad in zip(ps, grads):
                p.grad = grad.clone()
            o.step(2.0 - 0.5 * step)
        versions.append(strided._version)
        assert torch.equal(strided, twin) and torch.equal(other[0], other[1])
        for key in opt.state[strided]:
            a, b = opt.state[strided][key], ref.state[twin][key]
            assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())
    assert versions == sorted(set(versions))  # bumped at every step
    assert strided.data_ptr() == base.data_ptr()  # updated where it lies
    assert [b["staged"] for b in opt.describe()[0]] == [True, False]
    assert [b["backend"] for b in opt.describe()[0]] == [backend, backend]


@pytest.mark.parametrize("backend,device", FUSED)
def test_a_backend_named_refuses_a_gradient_laid_out_unlike_its_parameter(backend, device):
    p = torch.nn.Parameter(torch.randn(8, 8, device=device))
    opt = AdamL([p], backend=backend)
    p.grad = torch.ones(8, 8, device=device).t()
    with pytest.raises(ValueError, match="dense"):
        opt.step(1.0)
    assert not opt.state


def test_auto_moves_a_parameter_whose_new_gradient_is_laid_out_unlike_it():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = AdamL([p], lr=0.05)
    p.grad = torch.ones(8, 8)
    opt.step(1.0)
    fused = opt.describe()[0][0]["backend"]
    p.grad = torch.ones(8, 8).t()  # same values, transposed layout
    opt.step(1.0)
    assert opt.describe()[0][0]["backend"] == ("reference" if fused != "reference" else fused)
    assert float(opt.state[p]["step"]) == 2


@pytest.mark.skipif(_extension.load_error is not None, reason="needs adaml_kernels._C")
def test_auto_skips_the_cuda_kernel_on_a_gpu_it_has_no_code_for(monkeypatch):
    # E.g. a V100 (sm_70) under the default sm_80, sm_90 + PTX build.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(_extension, "cuda_kernel_error",
                        lambda device: "the CUDA kernel was not built for this GPU (sm_70)")
    device = torch.device("cuda", 0)
    assert "sm_70" in adaml_kernels.unavailable_backends(device)["cuda"]
    assert backends.select("auto", device, torch.float32) != "cuda"
    with pytest.raises(RuntimeError, match="sm_70"):
        backends.select("cuda", device, torch.float32)


# ------------------------------------------------------------------------------ tensor lr


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_any_one_element_lr_acts_as_a_scalar(backend, device, shape):
    results = []
    for lr in (torch.tensor(0.05, device=device), torch.full(shape, 0.05, device=device)):
        p = torch.ones(12, device=device, requires_grad=True)  # 1-d: a (1, 1) lr would widen it
        opt = AdamL([p], lr=lr, backend=backend)
        for step in range(2):
            p.grad = grads_for([p], step)[0]
            opt.step(1.0)
        results.append(p.detach().clone())
    assert results[1].shape == (12,)
    assert torch.equal(results[0], results[1])
