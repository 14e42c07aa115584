"""Under data parallelism every rank must use the same l: AdamL averages the loss."""

import os

import pytest
import torch
import torch.distributed as dist

import adaml_kernels
from adaml_kernels import AdamL
from ranks import OneRank, run_ranks

# The reference runs on the general path; the cpu backend (where built) on the steady-state one.
BACKENDS = [b for b in ("reference", "cpu") if b in adaml_kernels.available_backends("cpu")]

# Per rank; the means are 2.0, 1.5, (skipped: one rank's loss is NaN), 1.0.
LOSSES = {0: [1.0, 2.5, 7.0, 0.5], 1: [3.0, 0.5, float("nan"), 1.5]}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3)


def grads_for(step, model):
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)  # the same on every rank, as after all-reduce


def rank_main(rank, world, out_dir):
    for backend in BACKENDS:
        for loss_group in ("world", None):
            model = make_model()
            opt = AdamL(model.parameters(), lr=0.1, eps=1e-2, backend=backend,
                        loss_group=loss_group)
            for step, loss in enumerate(LOSSES[rank]):
                grads_for(step, model)
                opt.step(loss)  # a Python number: a NaN on one rank must not skip the all-reduce
            path = os.path.join(out_dir, f"{backend}-{loss_group}-rank{rank}.pt")
            torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(rank_main, 2, str(out))
    return {(b, group): [torch.load(out / f"{b}-{group}-rank{r}.pt") for r in (0, 1)]
            for b in BACKENDS for group in ("world", None)}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_with_different_losses_stay_identical(rank_results, backend):
    rank0, rank1 = rank_results[(backend, "world")]
    single = make_model()
    opt = AdamL(single.parameters(), lr=0.1, eps=1e-2, backend=backend)
    for step in range(len(LOSSES[0])):
        grads_for(step, single)
        opt.step(torch.tensor((LOSSES[0][step] + LOSSES[1][step]) / 2))
    assert opt.skipped_steps == 1
    for name, value in single.state_dict().items():
        assert torch.equal(rank0[name], rank1[name])
        torch.testing.assert_close(rank0[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("backend", BACKENDS)
def test_averaging_can_be_turned_off(rank_results, backend):
    rank0, rank1 = rank_results[(backend, None)]
    assert not torch.equal(rank0["weight"], rank1["weight"])


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_partial_dtensor_parameters_are_refused_clearly():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    with OneRank():
        mesh = init_device_mesh("cpu", (1,))
        param = torch.nn.Parameter(DTensor.from_local(torch.randn(4), mesh, [Partial()]))
        with pytest.raises(ValueError, match="Partial"):
            AdamL([param])
