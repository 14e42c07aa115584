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
