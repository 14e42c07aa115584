"""The steady-state path's ops (csrc/adaml_fast_path.cpp, table_step_ in adaml_ops.cpp) under
torch.library.opcheck, with the arguments the fast path really passes; and every backend's
in-place writes bump the version counters autograd checks, as torch's own optimizers do."""

import pytest
import torch

from adaml_kernels import AdamL, available_backends

needs_ext = pytest.mark.skipif("cpu" not in available_backends("cpu"),
                               reason="needs adaml_kernels._C")
ops = torch.ops.adaml_kernels


def stepped_optimizer(steps=2, **kwargs):
    """An AdamL on the cpu backend whose next step takes the fast path."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    opt = AdamL(model.parameters(), lr=1e-2, backend="cpu", **kwargs)
    for _ in range(steps):
        loss = model(torch.randn(8, 5)).pow(2).mean()
        loss.backward()
        opt.step(loss)
        opt.zero_grad()
    loss = model(torch.randn(8, 5)).pow(2).mean()
    loss.backward()
    assert opt.engine.fast is not None
    return model, opt, loss.detach()


@needs_ext
@pytest.mark.parametrize("telemetry", [False, True])
@pytest.mark.parametrize("normalize_loss", [False, True])
@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0])
def test_opcheck_fast_step(normalize_loss, found_inf, telemetry):
    # (It reads the tensors' addresses too: the AOT-dispatch check, which traces with copies,
    # cannot apply.)
    from adaml_kernels.hyperparams import group_launch_values

    model, opt, loss = stepped_optimizer(normalize_loss=normalize_loss, telemetry=telemetry)
    fast = opt.engine.fast
    slots, record = fast.check_args
    rows, rows_hosts, chunks, configs, bucket_groups, tables, telemetry = fast.launch_args
    args = (list(model.parameters()), slots, record, torch.zeros(1, dtype=torch.int64), rows,
            rows_hosts, chunks, configs, bucket_groups,
            list(group_launch_values(opt.param_groups[0])), [None], loss,
            None if found_inf is None else torch.tensor(found_inf), torch.tensor(2.0),
            opt.initial_loss.clone(), opt.engine.skipped.clone(), torch.zeros(()), tables,
            telemetry)
    torch.library.opcheck(ops.fast_step_.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@needs_ext
def test_opcheck_layout_record_and_refresh_grads():
    model, opt, _ = stepped_optimizer()
    params = list(model.parameters())
    # Both ops read the tensors' addresses, which the AOT-dispatch check changes (it traces
    # the op with copies of them): that check does not apply to them (the fast path never runs
    # under torch.compile).
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.layout_record.default, (params, [p.grad for p in params]),
                          test_utils=checks)
    status = torch.zeros(1, dtype=torch.int64)
    slots, record = opt.engine.fast.check_args
    rows, rows_hosts = opt.engine.fast.launch_args[:2]
    torch.library.opcheck(ops.refresh_grads_.default,
                          (params, slots, record, rows_hosts, rows, status), test_utils=checks)
    assert status.item() in (0, 1)  # the gradients were checked and repointed, nothing else


def backends_here():
    return [b for b in ("reference", "cpu", "triton") if b in available_backends("cpu")]


STATE_OPTIONS = [
    pytest.param(torch.float32, {}, id="float32"),
    pytest.param(torch.bfloat16, dict(master_weights=True), id="bf16-master"),
]


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype,options", STATE_OPTIONS)
def test_every_step_bumps_the_versions_of_everything_it_writes(backend, dtype, options):
    # As torch's fused Adam: the parameters, the moments, the master weights and the step counts
    # (a tensor saved by autograd, e.g. exp_avg used in a loss, is then seen to have changed).
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(dtype)
    opt = AdamL(model.parameters(), lr=1e-2, backend=backend, **options)
    for step in range(4):  # the first step (general path), then the steady state
        x = torch.randn(4, 3, dtype=dtype)
        loss = model(x).float().pow(2).sum()
        loss.backward()
        written = list(model.parameters()) + [
            t for p in model.parameters() for k, t in opt.state[p].items()
            if k in ("exp_avg", "exp_avg_sq", "master_param", "step")]
        assert len(written) == (2 + 2 * (3 + bool(options)) if step else 2)
        before = [t._version for t in written]
        opt.step(loss.detach())
        assert all(t._version > v for t, v in zip(written, before)), step
        opt.zero_grad()


@pytest.mark.parametrize("backend", backends_here())
def test_a_backward_through_weights_the_step_changed_raises(backend):
    # The classic mistake: a graph that saved the old weights, backpropagated after the step.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = AdamL(model.parameters(), lr=1e-2, backend=backend)
    for _ in range(3):
        x = torch.randn(4, 3, requires_grad=True)
        out = model(x).pow(2).sum()  # saves the weight for x's gradient
        out.backward(retain_graph=True)
        opt.step(out.detach())
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()
        opt.zero_grad()
