"""Gradient release under data parallelism (docs/gradient_release.md, DDP and FSDP2), on 2 gloo
ranks: each rank trains on its own batches, with DDP (AdamL's communication hook,
opt.register_ddp) or FSDP2 (the hooks FSDP2 calls after its reduce-scatter), and parameters,
state and state_dict() are bitwise those of the same model trained with the ordinary step
(add_loss after backward, then step()). The steps include one that rank 1 alone makes
non-finite (the averaged loss is, so every rank skips) and one of two accumulation micro-batches
(no_release()). Refusals: every way a gradient could reach a bucket unreduced.

All ranks run in one spawn (the module fixture); the tests compare what they saved.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.distributed as dist

from adaml_kernels import AdamL
from ranks import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

WORLD = 2
BF16 = torch.bfloat16
# Every term of the update shows: f_1 (normalize_loss), L2 decay, eps*l, gamma and phi.
HYPER = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-3, gamma=0.6, phi=1.3, loss_offset=0.05,
             normalize_loss=True, weight_decay=0.01)
CAP_MB = 0.002  # about 2 kB of gradient a release bucket: several in the model below
# (step, micro-batches, rank whose loss is NaN at that step)
STEPS = [(0, 1, None), (1, 1, None), (2, 1, 1), (3, 2, None), (4, 1, None)]



def ddp_no_sync(model):
    return model.no_sync()


@contextlib.contextmanager
def fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# name -> (parameter dtype, AdamL options, DDP options, how: see train_pair)
DDP_MODES = {
    "fp32": (torch.float32, {}, {}, {}),
    "fp32_bucket_view": (torch.float32, {}, dict(gradient_as_bucket_view=True), {}),
    "fp32_reference": (torch.float32, dict(backend="reference"), {}, {}),
    "fp32_no_sync": (torch.float32, {}, {}, dict(unsynced=ddp_no_sync)),
    "fp32_loss_in_two_parts": (torch.float32, {}, {}, dict(split=True)),
    "fp32_state_dict_reloaded": (torch.float32, {}, {}, dict(reload=1)),
    "bf16_moments": (torch.float32, dict(state_dtype=BF16), {}, {}),
    "8bit_moments": (torch.float32, dict(state_dtype=torch.uint8, stochastic_rounding=True,
                                         seed=4), {}, dict(hidden=128)),
    "bf16_master_sr": (BF16, dict(master_weights=True, stochastic_rounding=True, seed=3), {},
                       {}),
}
# name -> (parameter dtype, AdamL options, how)
FSDP_MODES = {
    "fp32": (torch.float32, {}, {}),
    "fp32_reference": (torch.float32, dict(backend="reference"), {}),
    "fp32_no_gradient_sync": (torch.float32, {}, dict(unsynced=fsdp_no_sync)),
    "fp32_state_dict_reloaded": (torch.float32, {}, dict(reload=1)),
    # HSDP: replicated over 2 ranks, shards of 1 (FSDP2 all-reduces, then calls the hooks)
    "fp32_hsdp": (torch.float32, {}, dict(mesh=(WORLD, 1))),
    "bf16_moments": (torch.float32, dict(state_dtype=BF16), {}),
    "bf16_master_sr": (BF16, dict(master_weights=True, stochastic_rounding=True, seed=3), {}),
}


def mlp(dtype=torch.float32, hidden=47):
    # 47 output rows: FSDP2 shards them 24 + 23 (uneven); 128: weights of 4096 and 6144
    # elements, large enough for 8-bit moments
    torch.manual_seed(0)
    layers = [torch.nn.Linear(32, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 48),
              torch.nn.Tanh(), torch.nn.Linear(48, 8)]
    return torch.nn.Sequential(*layers).to(dtype)


def batch(rank, step, micro, dtype):
    g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
    return torch.randn(8, 32, generator=g).to(dtype), torch.randn(8, 8, generator=g).to(dtype)


def loss_of(model, rank, step, micro, dtype, nan_rank):
    x, y = batch(rank, step, micro, dtype)
    loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
    return loss * math.nan if rank == nan_rank else loss


def loss_parts(model, rank, step, micro, dtype, nan_rank, split):
    """The loss, or with `split` the loss as two parts registered one by one (each add_loss
    outside no_release() starts an all-reduce of the sum so far)."""
    loss = loss_of(model, rank, step, micro, dtype, nan_rank)
    return [loss * 0.25, loss * 0.75] if split else [loss]


def ordinary_step(model, opt, rank, step, micro_batches, nan_rank, dtype, how):
    for micro in range(micro_batches):
        quiet = how.get("unsynced") if micro < micro_batches - 1 else None
        with quiet(model) if quiet else contextlib.nullcontext():
            parts = loss_parts(model, rank, step, micro, dtype, nan_rank, how.get("split"))
            sum(parts).backward()
        for part in parts:
            opt.add_loss(part)
    opt.step()
    opt.zero_grad()


def released_step(model, opt, rank, step, micro_batches, nan_rank, dtype, params, how):
    quiet = how.get("unsynced")
    with opt.no_release(), quiet(model) if quiet else contextlib.nullcontext():
        for micro in range(micro_batches - 1):
            loss = loss_of(model, rank, step, micro, dtype, nan_rank)
            opt.add_loss(loss)
            loss.backward()
    parts = loss_parts(model, rank, step, micro_batches - 1, dtype, nan_rank, how.get("split"))
    for part in parts:
        opt.add_loss(part)
    in_flight = opt.engine.release.loss_average is not None  # started by add_loss
    sum(parts).backward()
    freed = all(p.grad is None for p in params)
    opt.step()
    opt.zero_grad()
    return in_flight, freed


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def saved_run(params, opt) -> dict:
    """What the tests compare: the parameters, every state tensor and the state_dict(), with
    DTensors as this rank's shard."""
    def plain(value):
        if isinstance(value, torch.Tensor):
            return local(value).detach().clone()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v) for v in value)
        return value

    return dict(params=[plain(p) for p in params],
                state=[plain(dict(opt.state.get(p, {}))) for p in params],
                state_dict=plain(opt.state_dict()), skipped=opt.skipped_steps,
                f1=float(opt.initial_loss))


def train_pair(rank, make, modes_options, dtype, how=None, steps=STEPS):
    """The ordinary and the released run of one mode: (saved ordinary, saved released,
    extras). `how`: "unsynced", a context (of the model) for all but the last micro-batch, in
    which DDP or FSDP2 does not reduce; "split", the loss registered in two parts; "reload",
    the optimizer's state_dict() loaded back into it after that step (a new engine: the DDP
    registration must survive it)."""
    how = how or {}

    def copied(value):  # (copy.deepcopy cannot copy FSDP2's DTensor state here)
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: copied(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copied(v) for v in value]
        return copy.deepcopy(value)

    def reload(opt, step):
        if how.get("reload") == step:
            opt.load_state_dict(copied(opt.state_dict()))

    model, opt = make(gradient_release=False, **modes_options)
    for step, micro_batches, nan_rank in steps:
        ordinary_step(model, opt, rank, step, micro_batches, nan_rank, dtype, how)
        reload(opt, step)
    ordinary = saved_run(list(model.parameters()), opt)
    model, opt = make(gradient_release=True, bucket_cap_mb=CAP_MB, **modes_options)
    params = list(model.parameters())
    initial = [local(p).detach().clone() for p in params]
    flags = []
    for step, micro_batches, nan_rank in steps:
        flags.append(released_step(model, opt, rank, step, micro_batches, nan_rank, dtype,
                                   params, how))
        reload(opt, step)
    released = saved_run(params, opt)
    extras = dict(loss_started_in_add_loss=all(f[0] for f in flags),
                  grads_freed_by_backward=all(f[1] for f in flags),
                  release_buckets=len(opt.engine.release.buckets),
                  trained=all(not torch.equal(a, local(p).detach())
                              for a, p in zip(initial, params)))
    return ordinary, released, extras


# -------------------------------------------------------------------------------- workers


def ddp_runs(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for name, (dtype, options, ddp_options, how) in DDP_MODES.items():
        def make(gradient_release, dtype=dtype, ddp_options=ddp_options, how=how, **kwargs):
            # 2 DDP buckets from the second backward on (DDP's first has one): the hook hands
            # the first over when the second comes, the second at the end of backward
            model = DDP(mlp(dtype, how.get("hidden", 47)), bucket_cap_mb=0.005,
                        **ddp_options)
            opt = AdamL(model.parameters(), gradient_release=gradient_release, **HYPER, **kwargs)
            if gradient_release:
                opt.register_ddp(model)
            return model, opt

        out[name] = train_pair(rank, make, options, dtype, how)
    # A negative control: without loss averaging the ranks' l differ, and so do the results.
    def unaveraged(gradient_release, **kwargs):
        model = DDP(mlp(), bucket_cap_mb=0.005)
        opt = AdamL(model.parameters(), gradient_release=gradient_release, **HYPER, **kwargs,
                    **({} if not gradient_release else dict(loss_group=None)))
        if gradient_release:
            opt.register_ddp(model)
        return model, opt

    out["unaveraged"] = train_pair(rank, unaveraged, {}, torch.float32)
    return out


def fsdp_model(dtype, mesh_shape=(WORLD,)):
    """FSDP2 on a 1-D mesh, or HSDP on (replicate, shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = mlp(dtype)
    names = None if len(mesh_shape) == 1 else ("replicate", "shard")
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_runs(rank):
    out = {}
    for name, (dtype, options, how) in FSDP_MODES.items():
        def make(gradient_release, dtype=dtype, mesh_shape=how.get("mesh", (WORLD,)),
                 **kwargs):
            model = fsdp_model(dtype, mesh_shape)
            return model, AdamL(model.parameters(), gradient_release=gradient_release, **HYPER,
                                **kwargs)

        out[name] = train_pair(rank, make, options, dtype, how)
    return out


def refused(run, model) -> tuple:
    """(the error's message, or None; whether the parameters are unchanged)."""
    params = list(model.parameters())
    before = [local(p).detach().clone() for p in params]
    try:
        run()
        message = None
    except (RuntimeError, ValueError, TypeError) as e:
        message = str(e)
    return message, all(torch.equal(b, local(p).detach()) for b, p in zip(before, params))


def refusals(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, parallelize_module,
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}

    def released_backward(model, opt):
        def run():
            loss = loss_of(model, rank, 0, 0, torch.float32, None)
            opt.add_loss(loss)
            loss.backward()
        return run

    model = mlp()  # no DDP, no FSDP2: each rank's own gradients
    opt = AdamL(model.parameters(), gradient_release=True, **HYPER)
    out["plain"] = refused(released_backward(model, opt), model) + (len(opt.state),)

    model = DDP(mlp())  # DDP without register_ddp: the hooks see unreduced gradients
    opt = AdamL(model.parameters(), gradient_release=True, **HYPER)
    out["ddp_unregistered"] = refused(released_backward(model, opt), model) + (len(opt.state),)

    for name, ddp_options in (("find_unused", dict(find_unused_parameters=True)),
                              ("static_graph", dict(static_graph=True))):
        model = DDP(mlp(), **ddp_options)
        opt = AdamL(model.parameters(), gradient_release=True, **HYPER)
        out[name] = refused(lambda: opt.register_ddp(model), model) + (
            len(model._comm_hooks),)

    # Parameters of the DDP model that are not the optimizer's: their .grad after backward is
    # DDP's reduced gradient, as without AdamL's hook.
    plain_ddp, model = DDP(mlp()), DDP(mlp())
    opt = AdamL(model.module[0].parameters(), gradient_release=True, **HYPER)
    opt.register_ddp(model)
    for m in (plain_ddp, model):
        loss = loss_of(m, rank, 0, 0, torch.float32, None)
        if m is model:
            opt.add_loss(loss)
        loss.backward()
    out["others_reduced"] = (
        all(torch.equal(p.grad, q.grad) for p, q in zip(plain_ddp.module[2:].parameters(),
                                                         model.module[2:].parameters())),
        all(p.grad is None for p in model.module[0].parameters()))
    opt.step()

    model = DDP(mlp())
    opt = AdamL(model.parameters(), **HYPER)  # the ordinary step
    out["ordinary_register"] = refused(lambda: opt.register_ddp(model), model) + (
        len(model._comm_hooks),)

    model = mlp()
    opt = AdamL(model.parameters(), gradient_release=True, **HYPER)
    out["not_ddp"] = refused(lambda: opt.register_ddp(model), model) + (0,)

    torch.manual_seed(0)  # tensor parallel: autograd hands over each shard's gradient
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    parallelize_module(model, init_device_mesh("cpu", (WORLD,)),
                       {"0": ColwiseParallel(), "2": RowwiseParallel()})
    opt = AdamL(model.parameters(), gradient_release=True, loss_group=None, **HYPER)

    def tp_backward():
        x, y = batch(0, 0, 0, torch.float32)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.add_loss(loss)
        loss.backward()

    out["tensor_parallel"] = refused(tp_backward, model) + (len(opt.state),)
    return out


def worker(rank, world, out_dir):
    results = {"ddp": ddp_runs(rank), "fsdp": fsdp_runs(rank), "refusals": refusals(rank)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def worker_of_three(rank, world, out_dir):
    """DDP on 3 ranks, where 1 / 3 is not exact: AdamL's hook must reduce as DDP's default one
    (times 1 / world, then summed; dividing instead differs in the last bit)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make(gradient_release, **kwargs):
        model = DDP(mlp(), bucket_cap_mb=0.005)
        opt = AdamL(model.parameters(), gradient_release=gradient_release, **HYPER, **kwargs)
        if gradient_release:
            opt.register_ddp(model)
        return model, opt

    result = train_pair(rank, make, {}, torch.float32, steps=STEPS[:3])
    torch.save(result, f"{out_dir}/three_rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("release_dp")
    run_ranks(worker, WORLD, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------- comparisons


def assert_same(a, b, where=""):
    """Bitwise alike, NaN where NaN (f_1 before the first step taken)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        same_nan = a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(
            torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0))
        assert torch.equal(a, b) or same_nan, where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def check_pair(results, kind, mode, buckets_at_least):
    for rank, r in enumerate(results):
        ordinary, released, extras = r[kind][mode]
        assert_same(ordinary, released, f"rank {rank}")
        assert released["skipped"] == 1  # step 2: rank 1's loss is NaN, so the mean is
        assert not math.isnan(released["f1"])
        assert extras["loss_started_in_add_loss"]
        assert extras["grads_freed_by_backward"]
        assert extras["release_buckets"] >= buckets_at_least
        assert extras["trained"]  # every parameter moved
        steps = {int(st["step"]) for st in released["state"]}
        assert steps == {len(STEPS) - 1}  # one step skipped


@pytest.mark.parametrize("mode", list(DDP_MODES))
def test_ddp_release_is_bitwise_the_ordinary_step(ranks, mode):
    check_pair(ranks, "ddp", mode, buckets_at_least=3)
    # DDP's parameters are replicas: every rank's are the same
    assert_same(ranks[0]["ddp"][mode][1]["params"], ranks[1]["ddp"][mode][1]["params"])
    if mode == "8bit_moments":  # the weights' moments are 8-bit codes indeed
        state = ranks[0]["ddp"][mode][1]["state"]
        assert [state[i]["exp_avg"].dtype for i in (0, 2)] == [torch.uint8] * 2


@pytest.mark.parametrize("mode", list(FSDP_MODES))
def test_fsdp2_release_is_bitwise_the_ordinary_step(ranks, mode):
    check_pair(ranks, "fsdp", mode, buckets_at_least=3)
    # each rank holds its own shards: rows 24 + 23 of the first weight (HSDP: all of it)
    shapes = [tuple(r["fsdp"][mode][1]["params"][0].shape) for r in ranks]
    assert shapes == ([(47, 32)] * 2 if mode.endswith("hsdp") else [(24, 32), (23, 32)])


def test_the_comparison_can_fail_without_loss_averaging(ranks):
    # loss_group=None on the released run: each rank steps with its own l, and differs
    for r in ranks:
        ordinary, released, _ = r["ddp"]["unaveraged"]
        with pytest.raises(AssertionError):
            assert_same(ordinary["params"], released["params"])
    assert not all(torch.equal(p, q) for p, q in zip(ranks[0]["ddp"]["unaveraged"][1]["params"],
                                                     ranks[1]["ddp"]["unaveraged"][1]["params"]))


@pytest.mark.parametrize("case,error,match", [
    ("plain", RuntimeError, r"before it is reduced.*register_ddp"),
    ("ddp_unregistered", RuntimeError, r"before it is reduced.*register_ddp"),
    ("tensor_parallel", RuntimeError, r"DTensor parameter .*outside FSDP2"),
])
def test_unreduced_gradients_are_refused_before_anything_changes(ranks, case, error, match):
    import re

    for r in ranks:
        message, unchanged, state_entries = r["refusals"][case]
        assert message is not None and re.search(match, message), message
        assert unchanged and state_entries == 0


@pytest.mark.parametrize("case,match", [
    ("find_unused", "find_unused_parameters"),
    ("static_graph", "static_graph"),
    ("ordinary_register", r"needs AdamL\(\.\.\., gradient_release=True\)"),
    ("not_ddp", "DistributedDataParallel model"),
])
def test_ddp_settings_that_cannot_work_are_refused_at_register_ddp(ranks, case, match):
    import re

    for r in ranks:
        message, unchanged, hooks = r["refusals"][case]
        assert message is not None and re.search(match, message), message
        assert unchanged and hooks == 0  # no communication hook was registered


def test_ddp_release_on_3_ranks_reduces_bitwise_as_ddp(tmp_path):
    run_ranks(worker_of_three, 3, str(tmp_path))
    for rank in range(3):
        ordinary, released, extras = torch.load(tmp_path / f"three_rank{rank}.pt",
                                                weights_only=False)
        assert_same(ordinary, released, f"rank {rank}")
        assert released["skipped"] == 1 and extras["trained"]


def test_ddp_parameters_of_another_optimizer_get_ddps_reduced_gradient(ranks):
    for r in ranks:
        assert r["refusals"]["others_reduced"] == (True, True)
