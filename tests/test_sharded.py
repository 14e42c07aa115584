"""DTensor parameters on 2 CPU ranks: FSDP2 and tensor-parallel parity with one process, and
distributed checkpoints (DCP) saved and loaded across 1 and 2 ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

import adaml_kernels
from adaml_kernels import AdamL
from ranks import run_ranks
from tolerances import REFERENCE_BOUND

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

WORLD = 2
STEPS = 3
KWARGS = dict(lr=0.05, normalize_loss=True, weight_decay=0.01, phi=1.5)
# Float64 needs backends that take it; every CPU backend takes float32.
CASES = [(b, dt) for b in adaml_kernels.available_backends("cpu")
         for dt in (torch.float64, torch.float32)
         if dt == torch.float32 or b in ("reference", "cpu")]
# A sharded run reduces gradients in another order than one process: float64 agrees to a few
# ulps; float32 within the bound the reference itself keeps to the float64 spec (parity tests).
PARITY_BOUND = {torch.float64: 1e-12, torch.float32: REFERENCE_BOUND[torch.float32]}


def mlp(dtype=torch.float32):
    # Linear(5, 3) shards 2 + 1 rows (uneven); Linear(3, 1) shards 1 + 0 rows (an empty shard).
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)]
    return torch.nn.Sequential(*layers).to(dtype)


def batch(dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g).to(dtype), torch.randn(n, 1, generator=g).to(dtype)


def train(model, opt, x, y, losses=None):
    """STEPS steps on (x, y); a float in `losses` replaces that step's loss (e.g. NaN: skip)."""
    for k in range(STEPS if losses is None else len(losses)):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss if losses is None or losses[k] is None else losses[k])


def full_params(model) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for p in model.parameters()]


def normwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


# -------------------------------------------------------------------------------- workers


def fsdp_parity(rank, world, backend, dtype, device="cpu"):
    """Each rank trains on its share of the batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp(dtype).to(device)
    fully_shard(model, mesh=init_device_mesh(device, (world,)))
    shards = [tuple(p.to_local().shape) for p in model.parameters()]
    x, y = (t.to(device) for t in batch(dtype))
    half = x.shape[0] // world
    opt = AdamL(model.parameters(), backend=backend, **KWARGS)
    train(model, opt, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    state = opt.state[next(iter(model.parameters()))]
    return full_params(model), shards, type(state["exp_avg"]).__name__


def tp_parity(rank, world, backend):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, parallelize_module,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    parallelize_module(model, init_device_mesh("cpu", (world,)),
                       {"0": ColwiseParallel(), "2": RowwiseParallel()})
    placements = [str(p.placements) for p in model.parameters()]
    # Every rank sees the whole batch, so every rank has the same loss: nothing to average.
    opt = AdamL(model.parameters(), backend=backend, loss_group=None, **KWARGS)
    train(model, opt, *batch())
    return full_params(model), placements


def sharded_model(dtype=torch.float64):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp(dtype)
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return model


def dcp_round_trips(rank, world, out_dir):
    """Every rank sees the whole batch, so a 2-rank run is bitwise a 1-process run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict, get_state_dict, set_state_dict,
    )

    x, y = batch(torch.float64)
    results = {}
    # A fresh optimizer: DCP makes its state, and nothing else may change.
    model = sharded_model()
    opt = AdamL(model.parameters(), **KWARGS)
    before = full_params(model)
    osd = get_optimizer_state_dict(model, opt)
    results["fresh"] = dict(
        params_kept=all(torch.equal(a, b) for a, b in zip(before, full_params(model))),
        grads_none=all(p.grad is None for p in model.parameters()),
        lr_kept=opt.param_groups[0]["lr"] == KWARGS["lr"],
        steps=sorted({float(st["step"]) for st in osd["state"].values()}),
    )
    # Train (one step skipped), save from 2 ranks, go on uninterrupted.
    train(model, opt, x, y, losses=[None, float("nan"), None])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out_dir}/ckpt2")
    train(model, opt, x, y)
    results["uninterrupted"] = full_params(model)
    # Load into 2 fresh ranks and go on.
    for name, ckpt in (("from2", "ckpt2"), ("from1", "ckpt1")):
        model = sharded_model()
        opt = AdamL(model.parameters(), **KWARGS)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=f"{out_dir}/{ckpt}")
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        results[f"{name}_skipped"] = opt.skipped_steps
        results[f"{name}_f1"] = float(opt.initial_loss)
        train(model, opt, x, y)
        results[name] = full_params(model)
    return results


LOW_PRECISION = dict(stochastic_rounding=True, master_weights=True, state_dtype=torch.bfloat16,
                     seed=3)


def fsdp_low_precision(rank, world):
    """bf16 parameters in every low-precision mode; every rank sees the whole batch, so the run
    must be bitwise one process's: stochastic rounding by positions in the whole parameter."""
    model = sharded_model(torch.bfloat16)
    opt = AdamL(model.parameters(), **KWARGS, **LOW_PRECISION)
    train(model, opt, *batch(torch.bfloat16))
    return full_params(model)


def fsdp_refuses_8bit_moments(rank, world):
    """8-bit moments under FSDP2: refused with a clear error before anything changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128))  # 8,192 weights per shard: 8-bit
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = AdamL(model.parameters(), lr=0.05, state_dtype=torch.uint8)
    before = [p.detach().to_local().clone() for p in model.parameters()]
    loss = model(torch.randn(4, 128)).square().mean()
    loss.backward()
    try:
        opt.step(loss)
        message = None
    except ValueError as e:
        message = str(e)
    unchanged = all(torch.equal(b, p.detach().to_local())
                    for b, p in zip(before, model.parameters()))
    laid_out = any("exp_avg" in st for st in opt.state.values())
    return message, unchanged, laid_out


def worker(rank, world, out_dir):
    results = {
        "fsdp": {(b, str(dt)): fsdp_parity(rank, world, b, dt) for b, dt in CASES},
        "tp": {b: tp_parity(rank, world, b) for b in adaml_kernels.available_backends("cpu")},
        "dcp": dcp_round_trips(rank, world, out_dir),
        "low_precision": fsdp_low_precision(rank, world),
        "refuses_8bit": fsdp_refuses_8bit_moments(rank, world),
    }
    torch.save(results, f"{out_dir}/rank{rank}.pt")


# ---------------------------------------------------------------------- one process and tests


def one_process_checkpoint(out_dir):
    """The 1-process run the DCP tests compare with; saves its checkpoint as ckpt1."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    x, y = batch(torch.float64)
    model = mlp(torch.float64)
    opt = AdamL(model.parameters(), **KWARGS)
    train(model, opt, x, y, losses=[None, float("nan"), None])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out_dir}/ckpt1", no_dist=True)
    train(model, opt, x, y)
    return full_params(model)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    single = one_process_checkpoint(out)
    run_ranks(worker, WORLD, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], single, out


@pytest.mark.parametrize("backend,dtype", CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CASES])
def test_fsdp2_matches_one_process_on_the_whole_batch(ranks, backend, dtype):
    results, _, _ = ranks
    (params0, shards0, kind), (params1, shards1, _) = (r["fsdp"][(backend, str(dtype))]
                                                       for r in results)
    assert shards0 == [(2, 5), (2,), (1, 3), (1,)] and shards1 == [(1, 5), (1,), (0, 3), (0,)]
    assert kind == "DTensor"  # the state of a DTensor parameter is a DTensor
    model = mlp(dtype)
    opt = AdamL(model.parameters(), backend=backend, **KWARGS)
    train(model, opt, *batch(dtype))
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))
    assert normwise(params0, full_params(model)) <= PARITY_BOUND[dtype]


@pytest.mark.parametrize("backend", adaml_kernels.available_backends("cpu"))
def test_tensor_parallel_matches_one_process(ranks, backend):
    results, _, _ = ranks
    params, placements = results[0]["tp"][backend]
    assert placements == ["(Shard(dim=0),)", "(Shard(dim=0),)", "(Shard(dim=1),)",
                          "(Replicate(),)"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = AdamL(model.parameters(), backend=backend, **KWARGS)
    train(model, opt, *batch())
    assert normwise(params, full_params(model)) <= PARITY_BOUND[torch.float32]


def test_fsdp2_low_precision_modes_round_as_one_process_bitwise(ranks):
    model = mlp(torch.bfloat16)
    opt = AdamL(model.parameters(), **KWARGS, **LOW_PRECISION)
    train(model, opt, *batch(torch.bfloat16))
    for r in ranks[0]:
        assert all(torch.equal(a, b) for a, b in zip(r["low_precision"], full_params(model)))


def test_dcp_state_of_a_fresh_optimizer_changes_nothing(ranks):
    for r in ranks[0]:
        assert r["dcp"]["fresh"] == dict(params_kept=True, grads_none=True, lr_kept=True,
                                         steps=[0.0])


def test_dcp_from_2_ranks_into_2_ranks_continues_bitwise(ranks):
    for r in ranks[0]:
        d = r["dcp"]
        assert d["from2_skipped"] == 1
        assert all(torch.equal(a, b) for a, b in zip(d["from2"], d["uninterrupted"]))


def test_dcp_from_1_process_into_2_ranks_continues_bitwise(ranks):
    results, single, _ = ranks
    for r in results:
        assert r["dcp"]["from1_skipped"] == 1
        assert all(torch.equal(a, b) for a, b in zip(r["dcp"]["from1"], single))


def test_dcp_from_2_ranks_into_1_process_continues_bitwise(ranks):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    results, single, out = ranks
    model = mlp(torch.float64)
    opt = AdamL(model.parameters(), **KWARGS)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=f"{out}/ckpt2", no_dist=True)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt.skipped_steps == 1
    assert float(opt.initial_loss) == results[0]["dcp"]["from2_f1"]
    train(model, opt, *batch(torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(full_params(model), single))
    assert all(torch.equal(a, b) for a, b in zip(single, results[0]["dcp"]["uninterrupted"]))
    np.testing.assert_equal(results[0]["dcp"]["from1_f1"], results[0]["dcp"]["from2_f1"])


# ------------------------------------------------------------------------------------ GPUs

GPU_BACKENDS = adaml_kernels.available_backends("cuda") if torch.cuda.is_available() else []


def gpu_worker(rank, world, out_dir):
    results = {b: fsdp_parity(rank, world, b, torch.float32, "cuda") for b in GPU_BACKENDS}
    torch.save(results, f"{out_dir}/gpu-rank{rank}.pt")


@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA GPU and a GPU backend")
def test_fsdp2_on_gpus_matches_one_process(tmp_path):
    # One rank per GPU over NCCL: a 1-rank mesh on one GPU, 2 ranks where there are 2.
    world = min(2, torch.cuda.device_count())
    run_ranks(gpu_worker, world, str(tmp_path), backend="nccl")
    results = torch.load(tmp_path / "gpu-rank0.pt", weights_only=False)
    for backend in GPU_BACKENDS:
        model = mlp().cuda()
        opt = AdamL(model.parameters(), backend=backend, **KWARGS)
        train(model, opt, *(t.cuda() for t in batch()))
        params, _, kind = results[backend]
        assert kind == "DTensor"
        assert normwise(params, full_params(model)) <= PARITY_BOUND[torch.float32], backend


def test_fsdp2_refuses_8bit_moments_before_anything_changes(ranks):
    results, _, _ = ranks
    for r in results:
        message, unchanged, laid_out = r["refuses_8bit"]
        assert message is not None and "8-bit moments" in message and "DTensor" in message
        assert unchanged and not laid_out
