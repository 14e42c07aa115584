"""Runs a backend and the float64 oracle side by side on the same random inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

import adaml_kernels
from adaml_kernels import AdamL
from oracle import Hyper, Oracle, ParamState
from tolerances import REFERENCE_BOUND, allowed_error, allowed_mismatch

STEPS = 8

# Every term of the update is large enough to show in the result: eps*l is about 1% of w,
# gamma and phi move the adaptive term, and loss_offset shifts l.
LOUD = Hyper(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-3, gamma=0.6, phi=1.3, loss_offset=0.25)

CASES = {
    "defaults": Hyper(),
    "loud": LOUD,
    "l2_weight_decay": replace(LOUD, weight_decay=0.1),
    "decoupled_weight_decay": replace(LOUD, weight_decay=0.1, decoupled_weight_decay=True),
    "maximize": replace(LOUD, maximize=True),
    "normalize_loss": replace(LOUD, normalize_loss=True),
    "eps_zero": replace(LOUD, eps=0.0),
    "phi_zero": replace(LOUD, phi=0.0),
    "betas_zero": replace(LOUD, beta1=0.0, beta2=0.0),
    "everything": replace(LOUD, weight_decay=0.05, maximize=True, normalize_loss=True),
}

# Sizes of the tensors of one many-tensor bucket: full chunks, tails, and single elements.
MIXED_SIZES = [1, 7, 1023, 4097, 2048, 3, 64, 511, 130, 1, 9, 33]


def cpu_testable_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs that run on this machine, the GPU ones included when present."""
    pairs = [(name, "cpu") for name in adaml_kernels.available_backends("cpu")]
    if torch.cuda.is_available():
        pairs += [(name, "cuda") for name in adaml_kernels.available_backends("cuda")]
    return pairs


def fused_pairs() -> list[tuple[str, str]]:
    return [(b, d) for b, d in cpu_testable_backends() if b != "reference"]


@dataclass
class Inputs:
    """One experiment: initial parameters, and per step the gradients and the loss."""

    params: list[np.ndarray]
    grads: list[list[np.ndarray | None]]  # [step][tensor]; None: no gradient in that step
    losses: list[float]

    @staticmethod
    def random(sizes, hp: Hyper, seed: int, losses: list[float] | None = None) -> "Inputs":
        rng = np.random.default_rng(seed)
        params = [rng.standard_normal(n) for n in sizes]
        grads = [[rng.standard_normal(n) for n in sizes] for _ in range(STEPS)]
        if losses is None:
            losses = list(hp.loss_offset + np.exp(rng.normal(0.0, 0.5, STEPS)))
        return Inputs(params, grads, losses)

    def without_grads(self, has_grad) -> "Inputs":
        """The same inputs where has_grad(step, tensor) is False drops that gradient."""
        grads = [[g if has_grad(k, i) else None for i, g in enumerate(step)]
                 for k, step in enumerate(self.grads)]
        return Inputs(self.params, grads, self.losses)


@dataclass
class Result:
    params: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    steps: list[float]
    initial_losses: list[float]  # per parameter with state (all one value: f_1)


def as_torch(x: np.ndarray, dtype, device) -> torch.Tensor:
    return torch.from_numpy(x).to(device=device, dtype=dtype, copy=True)


def run_backend(backend, device, dtype, inputs: Inputs, hp: Hyper, lr_tensor=False) -> Result:
    params = [as_torch(p, dtype, device).requires_grad_() for p in inputs.params]
    kwargs = hp.optimizer_kwargs()
    if lr_tensor:
        kwargs["lr"] = torch.tensor(hp.lr, device=device)
    opt = AdamL(params, backend=backend, **kwargs)
    for grads, loss in zip(inputs.grads, inputs.losses):
        for p, g in zip(params, grads):
            p.grad = None if g is None else as_torch(g, dtype, device)
        opt.step(torch.tensor(loss, dtype=torch.float32, device=device))
    zeros = {"exp_avg": torch.zeros(0), "exp_avg_sq": torch.zeros(0), "step": 0.0}
    state = [opt.state[p] if p in opt.state else zeros for p in params]
    return Result(
        [p.detach() for p in params],
        [s["exp_avg"] for s in state],
        [s["exp_avg_sq"] for s in state],
        [float(s["step"]) for s in state],
        [float(opt.state[p]["initial_loss"]) for p in params if p in opt.state],
    )


def run_oracle(dtype, inputs: Inputs, hp: Hyper) -> Oracle:
    storage = str(dtype).removeprefix("torch.")
    # The oracle starts from the values the backend actually holds, and sees the gradients and
    # losses the backend sees (rounded to the parameter dtype, and to float32).
    oracle = Oracle(hp, [
        ParamState(as_torch(p, dtype, "cpu").double().numpy(), storage=storage)
        for p in inputs.params
    ])
    for grads, loss in zip(inputs.grads, inputs.losses):
        oracle.step(
            [None if g is None else as_torch(g, dtype, "cpu").double().numpy() for g in grads],
            float(np.float32(loss)),
        )
    return oracle


def normwise_error(values: list[torch.Tensor], expected: list[np.ndarray]) -> float:
    worst = 0.0
    for v, e in zip(values, expected):
        v = v.detach().double().cpu().numpy()
        if v.size == 0 and not np.any(e):  # a parameter never stepped has no state
            continue
        scale = np.abs(e).max()
        if scale > 0:
            worst = max(worst, np.abs(v - e).max() / scale)
        else:
            worst = max(worst, np.abs(v).max())
    return worst


def mismatch_fraction(values: list[torch.Tensor], expected: list[np.ndarray]) -> float:
    v = np.concatenate([t.detach().double().cpu().numpy().ravel() for t in values])
    e = np.concatenate([x.ravel() for x in expected])
    return float(np.mean(v != e))


def errors(result: Result, oracle: Oracle) -> dict[str, float]:
    return {
        "param": normwise_error(result.params, [s.p for s in oracle.params]),
        "exp_avg": normwise_error(result.exp_avgs, [s.m for s in oracle.params]),
        "exp_avg_sq": normwise_error(result.exp_avg_sqs, [s.w for s in oracle.params]),
    }


def check_against_oracle(backend, device, dtype, inputs: Inputs, hp: Hyper, lr_tensor=False):
    """Run `backend` and assert it is as close to the oracle as the reference allows."""
    oracle = run_oracle(dtype, inputs, hp)
    result = run_backend(backend, device, dtype, inputs, hp, lr_tensor)
    reference = run_backend("reference", "cpu", dtype, inputs, hp, lr_tensor)
    got, ref = errors(result, oracle), errors(reference, oracle)
    # The moments are float32 (float64), but with L2 weight decay the gradient carries the
    # parameter, so they are only as precise as the parameter's dtype.
    coupled = hp.weight_decay > 0 and not hp.decoupled_weight_decay
    moment_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    moment_precision = dtype if coupled else moment_dtype
    for key, quantity_dtype in (("param", dtype), ("exp_avg", moment_precision),
                                ("exp_avg_sq", moment_precision)):
        assert ref[key] <= REFERENCE_BOUND[quantity_dtype], (
            f"reference backend is {ref[key]:.3g} from the oracle in {key} ({dtype})"
        )
        assert got[key] <= allowed_error(quantity_dtype, ref[key]), (
            f"{backend} on {device}: {key} error {got[key]:.3g}, reference {ref[key]:.3g}"
        )
    if dtype in (torch.float16, torch.bfloat16):
        expected = [s.p for s in oracle.params]
        got_mismatch = mismatch_fraction(result.params, expected)
        ref_mismatch = mismatch_fraction(reference.params, expected)
        assert got_mismatch <= allowed_mismatch(ref_mismatch), (
            f"{backend}: {got_mismatch:.1%} of {dtype} params differ from the rounded oracle "
            f"(reference: {ref_mismatch:.1%}); is the rounding to nearest even?"
        )
    assert result.steps == [float(s.k) for s in oracle.params]
    # f_1 is one value, exactly the first loss taken (as the backend saw it), for every state.
    np.testing.assert_array_equal(
        result.initial_losses, [oracle.f1] * len(result.initial_losses))
    return got
