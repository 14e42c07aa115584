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


# 8-bit moments: both weights shard into whole 256-element blocks (64 x 64 and 32 x 128 per
# rank), so a sharded run is bitwise one process's; the biases keep float32 moments.
KWARGS_8BIT = dict(lr=0.01, normalize_loss=True, state_dtype=torch.uint8,
                   stochastic_rounding=True, seed=5)


def mlp_8bit():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64)]
    return torch.nn.Sequential(*layers)


def batch_8bit():
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)


def sharded_8bit(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp_8bit()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def load_dcp(model, opt, checkpoint_id, **kwargs):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=checkpoint_id, **kwargs)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def fsdp_8bit_moments(rank, world, out_dir):
    """Train, save from 2 ranks, go on; load that and one process's checkpoint into 2 fresh
    ranks and go on; and a parameter whose shards are not whole blocks, refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x, y = batch_8bit()
    model = sharded_8bit(world)
    opt = AdamL(model.parameters(), **KWARGS_8BIT)
    train(model, opt, x, y)
    weight = opt.state[model[0].weight]
    out = {"kinds": {k: (type(v).__name__, str(v.dtype), tuple(v.shape), tuple(local_of(v).shape))
                     for k, v in weight.items() if k != "step"}}
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out_dir}/ckpt8_2")
    train(model, opt, x, y)
    out["uninterrupted"] = full_params(model)
    for name, ckpt in (("from2", "ckpt8_2"), ("from1", "ckpt8_1")):
        model = sharded_8bit(world)
        opt = AdamL(model.parameters(), **KWARGS_8BIT)
        load_dcp(model, opt, f"{out_dir}/{ckpt}")
        train(model, opt, x, y)
        out[name] = full_params(model)
    # One process's plain state_dict() (whole tensors) loaded into 2 ranks: each slices its own.
    model = sharded_8bit(world)
    opt = AdamL(model.parameters(), **KWARGS_8BIT)
    load_dcp(model, opt, f"{out_dir}/ckpt8_1")
    opt.load_state_dict(torch.load(f"{out_dir}/state_dict8_1.pt", weights_only=False))
    train(model, opt, x, y)
    out["from1_plain"] = full_params(model)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 61))  # shards of 31 x 100 and 30 x 100
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = AdamL(model.parameters(), lr=0.05, state_dtype=torch.uint8)
    before = [p.detach().to_local().clone() for p in model.parameters()]
    loss = model(torch.randn(4, 100)).square().mean()
    loss.backward()
    try:
        opt.step(loss)
        message = None
    except ValueError as e:
        message = str(e)
    unchanged = all(torch.equal(b, p.detach().to_local())
                    for b, p in zip(before, model.parameters()))
    out["refused"] = message, unchanged, any("exp_avg" in st for st in opt.state.values())
    return out


def local_of(t):
    return t.to_local() if hasattr(t, "to_local") else t


def worker(rank, world, out_dir):
    results = {
        "fsdp": {(b, str(dt)): fsdp_parity(rank, world, b, dt) for b, dt in CASES},
        "tp": {b: tp_parity(rank, world, b) for b in adaml_kernels.available_backends("cpu")},
        "dcp": dcp_round_trips(rank, world, out_dir),
        "low_precision": fsdp_low_precision(rank, world),
        "8bit": fsdp_8bit_moments(rank, world, out_dir),
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


def one_process_8bit_checkpoint(out_dir):
    """The 1-process run of fsdp_8bit_moments; saves its checkpoint as ckpt8_1."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    x, y = batch_8bit()
    model = mlp_8bit()
    opt = AdamL(model.parameters(), **KWARGS_8BIT)
    train(model, opt, x, y)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out_dir}/ckpt8_1", no_dist=True)
    torch.save(opt.state_dict(), f"{out_dir}/state_dict8_1.pt")
    train(model, opt, x, y)
    return full_params(model)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    single = one_process_checkpoint(out)
    single_8bit = one_process_8bit_checkpoint(out)
    run_ranks(worker, WORLD, str(out))
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in results:
        r["single_8bit"] = single_8bit
    return results, single, out


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


def test_fsdp2_8bit_moments_are_dtensors_of_whole_blocks(ranks):
    for r in ranks[0]:
        kinds = r["8bit"]["kinds"]
        assert kinds["exp_avg"] == ("DTensor", "torch.uint8", (128, 64), (64, 64))
        assert kinds["exp_avg_sq"] == ("DTensor", "torch.uint8", (128, 64), (64, 64))
        for key in ("exp_avg_scale", "exp_avg_sq_scale"):  # 8192 / 256 blocks, half per rank
            assert kinds[key] == ("DTensor", "torch.float32", (32,), (16,))


def test_fsdp2_with_8bit_moments_is_bitwise_one_process_where_blocks_line_up(ranks):
    for r in ranks[0]:
        d = r["8bit"]
        assert all(torch.equal(a, b) for a, b in zip(d["uninterrupted"], r["single_8bit"]))


def test_dcp_of_8bit_moments_resumes_bitwise_from_2_ranks_and_from_1_process(ranks):
    for r in ranks[0]:
        d = r["8bit"]
        assert all(torch.equal(a, b) for a, b in zip(d["from2"], d["uninterrupted"]))
        assert all(torch.equal(a, b) for a, b in zip(d["from1"], r["single_8bit"]))
        assert all(torch.equal(a, b) for a, b in zip(d["from1_plain"], r["single_8bit"]))


def test_dcp_of_8bit_moments_from_2_ranks_into_1_process_resumes_bitwise(ranks):
    results, _, out = ranks
    model = mlp_8bit()
    opt = AdamL(model.parameters(), **KWARGS_8BIT)
    load_dcp(model, opt, f"{out}/ckpt8_2", no_dist=True)
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8
    train(model, opt, *batch_8bit())
    assert all(torch.equal(a, b) for a, b in zip(full_params(model), results[0]["single_8bit"]))


def test_fsdp2_refuses_8bit_moments_of_shards_that_are_not_whole_blocks(ranks):
    results, _, _ = ranks
    for r in results:
        message, unchanged, laid_out = r["8bit"]["refused"]
        assert message is not None and "8-bit moments" in message and "whole blocks" in message
        assert unchanged and not laid_out
