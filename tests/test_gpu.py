"""GPU-only behaviour of the fused backends: no host synchronisation, CUDA-graph capture."""

import pytest
import torch

import adaml_kernels
from adaml_kernels import AdamL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = adaml_kernels.available_backends("cuda") if torch.cuda.is_available() else []


def make(backend, dtype=torch.float32, lr=1e-2):
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda", dtype=dtype, requires_grad=True)
              for s in [(1000, 33), (7,), (4097,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    return params, AdamL(params, lr=lr, normalize_loss=True, weight_decay=0.01,
                         backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_step_never_synchronises(backend, tensor_lr):
    params, opt = make(backend, lr=torch.tensor(1e-2, device="cuda") if tensor_lr else 1e-2)
    loss, nan = torch.tensor(1.5, device="cuda"), torch.tensor(float("nan"), device="cuda")
    opt.step(loss)  # builds state and tables (allowed to copy host data once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step(loss)
            opt.step(nan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_steps == 3


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_step_replays_like_eager(backend, dtype):
    eager_params, eager = make(backend, dtype)
    graph_params, captured = make(backend, dtype)
    losses = [2.0, 1.5, float("nan"), 1.2, 1.1]
    static_loss = torch.tensor(3.0, device="cuda")

    # Warm up on a side stream (state, tables), then capture one step.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        captured.step(static_loss)
        eager.step(torch.tensor(3.0, device="cuda"))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step(static_loss)

    for loss in losses:
        static_loss.fill_(loss)
        graph.replay()
        eager.step(torch.tensor(loss, device="cuda"))
    torch.cuda.synchronize()
    for a, b in zip(graph_params, eager_params):
        assert torch.equal(a, b)
    for a, b in zip(graph_params, eager_params):
        for key in ("exp_avg", "exp_avg_sq", "step", "initial_loss"):
            assert torch.equal(captured.state[a][key], eager.state[b][key])


def _no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_rebuilds_number_losses_and_cpu_lr_never_synchronise(backend):
    # The set of parameters with gradients changes every step (frozen branches, MoE experts):
    # each step makes a new plan and table, by non-blocking copies. A Python-number loss is
    # filled in on the device; a CPU tensor lr is copied without waiting.
    params, opt = make(backend, lr=torch.tensor(1e-2))
    opt.step(torch.tensor(1.5, device="cuda"))

    def steps():
        for k in range(10):
            for i, p in enumerate(params):
                p.grad = torch.randn_like(p) if (i + k) % 2 else None
            opt.step(1.5 if k % 3 else torch.tensor(1.2, device="cuda"))

    _no_sync(steps)
    assert float(opt.state[params[0]]["step"]) == 6


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_functional_form_never_synchronises(backend):
    from adaml_kernels import adaml_step_

    params = [torch.randn(n, device="cuda") for n in (5, 4099)]
    grads = [torch.randn_like(p) for p in params]
    m, w = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device="cuda") for _ in params]
    f1 = torch.full((), float("nan"), dtype=torch.float64, device="cuda")

    def run():
        for loss in (2.0, 1.5, torch.tensor(1.2, device="cuda")):
            adaml_step_(params, grads, m, w, steps, loss, initial_loss=f1, normalize_loss=True,
                        backend=backend)

    _no_sync(run)
    assert [float(s) for s in steps] == [3.0, 3.0] and float(f1) == 2.0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_parameters_with_a_gpu_loss_and_grad_scaler_match_an_all_cpu_run(backend):
    # CPU-offloaded parameters: the loss and found_inf live on the GPU and must have landed
    # on the host before the CPU kernel reads them (a blocking copy, one sync per step).
    if backend not in adaml_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} is not available")
    torch.manual_seed(0)
    start = [torch.randn(n) for n in (3, 2049)]
    runs = []
    for loss_device in ("cuda", "cpu"):
        params = [s.clone().requires_grad_() for s in start]
        opt = AdamL(params, lr=1e-2, normalize_loss=True, backend=backend)
        for k in range(4):
            for p in params:
                p.grad = torch.full_like(p, 0.1 * (k + 1))
            opt.grad_scale = torch.tensor(2.0, device=loss_device)
            opt.found_inf = torch.tensor(1.0 if k == 2 else 0.0, device=loss_device)
            # A loss produced by a long GPU computation: a racing read would see the old value.
            loss = torch.full((4096, 4096), 1.0 + k, device=loss_device).sum() / 4096**2
            opt.step(loss)
            del opt.grad_scale, opt.found_inf
        runs.append(([p.detach() for p in params], opt.skipped_steps))
    assert runs[0][1] == runs[1][1] == 1
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
