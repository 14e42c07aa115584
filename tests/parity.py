"""Runs a backend and the float64 oracle side by side on the same random inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

import adaml_kernels
from adaml_kernels import AdamL
from oracle import Hyper, Oracle, ParamState
from tolerances import (
    REFERENCE_BOUND, REFERENCE_BOUND_WITH_BF16_MOMENTS, allowed_error, allowed_mismatch,
)

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


@dataclass(frozen=True)
class Mode:
    """A low-precision mode (docs/low_precision.md): AdamL's options, and the gradients' dtype
    (None: the parameters')."""

    stochastic_rounding: bool = False
    master_weights: bool = False
    state_dtype: torch.dtype | None = None
    grad_dtype: torch.dtype | None = None
    seed: int = 0

    def optimizer_kwargs(self) -> dict:
        return dict(stochastic_rounding=self.stochastic_rounding,
                    master_weights=self.master_weights, state_dtype=self.state_dtype,
                    seed=self.seed)

    def moments(self, dtype: torch.dtype) -> torch.dtype:
        if dtype == torch.float64:
            return torch.float64
        return self.state_dtype or torch.float32

    def has_master(self, dtype: torch.dtype) -> bool:
        return self.master_weights and dtype in (torch.float16, torch.bfloat16)


PLAIN = Mode()


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
    masters: list[torch.Tensor] | None = None  # master weights (master_weights), else None


def as_torch(x: np.ndarray, dtype, device) -> torch.Tensor:
    return torch.from_numpy(x).to(device=device, dtype=dtype, copy=True)


def run_backend(backend, device, dtype, inputs: Inputs, hp: Hyper, lr_tensor=False,
                mode: Mode = PLAIN) -> Result:
    params = [as_torch(p, dtype, device).requires_grad_() for p in inputs.params]
    grad_dtype = mode.grad_dtype or dtype
    if grad_dtype != dtype:
        for p in params:
            p.grad_dtype = grad_dtype  # torch accepts .grad of another dtype only so
    kwargs = hp.optimizer_kwargs()
    if lr_tensor:
        kwargs["lr"] = torch.tensor(hp.lr, device=device)
    opt = AdamL(params, backend=backend, **kwargs, **mode.optimizer_kwargs())
    for grads, loss in zip(inputs.grads, inputs.losses):
        for p, g in zip(params, grads):
            p.grad = None if g is None else as_torch(g, grad_dtype, device)
        opt.step(torch.tensor(loss, dtype=torch.float32, device=device))
    zeros = {"exp_avg": torch.zeros(0), "exp_avg_sq": torch.zeros(0), "step": 0.0,
             "master_param": torch.zeros(0)}
    state = [opt.state[p] if p in opt.state else zeros for p in params]
    return Result(
        [p.detach() for p in params],
        [s["exp_avg"] for s in state],
        [s["exp_avg_sq"] for s in state],
        [float(s["step"]) for s in state],
        [float(opt.state[p]["initial_loss"]) for p in params if p in opt.state],
        [s["master_param"] for s in state] if mode.has_master(dtype) else None,
    )


def run_oracle(dtype, inputs: Inputs, hp: Hyper, mode: Mode = PLAIN) -> Oracle:
    storage = str(dtype).removeprefix("torch.")
    moments = str(mode.moments(dtype)).removeprefix("torch.")
    grad_dtype = mode.grad_dtype or dtype
    # The oracle starts from the values the backend actually holds, and sees the gradients and
    # losses the backend sees (rounded to the gradient dtype, and to float32).
    states = []
    for j, p in enumerate(inputs.params):
        held = as_torch(p, dtype, "cpu").double().numpy()
        states.append(ParamState(held, storage=storage, moments=moments, index=j,
                                 master=held.copy() if mode.has_master(dtype) else None))
    oracle = Oracle(hp, states, stochastic_rounding=mode.stochastic_rounding, seed=mode.seed)
    for grads, loss in zip(inputs.grads, inputs.losses):
        oracle.step(
            [None if g is None else as_torch(g, grad_dtype, "cpu").double().numpy()
             for g in grads],
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
    pairs = [(t, x) for t, x in zip(values, expected) if t.numel() or not x.size]  # no state
    v = np.concatenate([t.detach().double().cpu().numpy().ravel() for t, _ in pairs])
    e = np.concatenate([x.ravel() for _, x in pairs])
    return float(np.mean(v != e))


def errors(result: Result, oracle: Oracle) -> dict[str, float]:
    out = {
        "param": normwise_error(result.params, [s.p for s in oracle.params]),
        "exp_avg": normwise_error(result.exp_avgs, [s.m for s in oracle.params]),
        "exp_avg_sq": normwise_error(result.exp_avg_sqs, [s.w for s in oracle.params]),
    }
    if result.masters is not None:  # (a parameter never stepped has no master weight)
        pairs = [(t, s.master) for t, s in zip(result.masters, oracle.params) if t.numel()]
        out["master_param"] = normwise_error(*zip(*pairs))
    return out


def check_against_oracle(backend, device, dtype, inputs: Inputs, hp: Hyper, lr_tensor=False,
                         mode: Mode = PLAIN):
    """Run `backend` and assert it is as close to the oracle as the reference allows."""
    oracle = run_oracle(dtype, inputs, hp, mode)
    result = run_backend(backend, device, dtype, inputs, hp, lr_tensor, mode)
    reference = run_backend("reference", "cpu", dtype, inputs, hp, lr_tensor, mode)
    got, ref = errors(result, oracle), errors(reference, oracle)
    # The moments are float32 (float64, or bf16 under state_dtype), but with L2 weight decay the
    # gradient carries the parameter, so they are only as precise as the parameter's dtype (its
    # master weight's, float32, under master weights).
    coupled = hp.weight_decay > 0 and not hp.decoupled_weight_decay
    held = torch.float32 if mode.has_master(dtype) else dtype
    moment_dtype = mode.moments(dtype)
    moment_precision = moment_dtype
    if coupled and torch.finfo(held).eps > torch.finfo(moment_dtype).eps:
        moment_precision = held
    quantities = [("param", dtype), ("exp_avg", moment_precision),
                  ("exp_avg_sq", moment_precision)]
    if result.masters is not None:
        quantities.append(("master_param", torch.float32))
    bounds = dict(REFERENCE_BOUND)
    for key, quantity_dtype in quantities:
        bound = bounds[quantity_dtype]
        if key == "param" and moment_dtype == torch.bfloat16:
            bound = REFERENCE_BOUND_WITH_BF16_MOMENTS.get(quantity_dtype, bound)
        assert ref[key] <= bound, (
            f"reference backend is {ref[key]:.3g} from the oracle in {key} ({dtype})"
        )
        assert got[key] <= allowed_error(quantity_dtype, ref[key]), (
            f"{backend} on {device}: {key} error {got[key]:.3g}, reference {ref[key]:.3g}"
        )
    # Values stored in a half type must be the oracle's own rounding of them (to nearest even,
    # or stochastic with the same bits) but for rare elements where float32 and float64 results
    # straddle a rounding boundary.
    rounded = [("params", result.params, reference.params, [s.p for s in oracle.params])]
    if moment_dtype == torch.bfloat16:
        rounded += [
            ("exp_avgs", result.exp_avgs, reference.exp_avgs, [s.m for s in oracle.params]),
            ("exp_avg_sqs", result.exp_avg_sqs, reference.exp_avg_sqs,
             [s.w for s in oracle.params]),
        ]
    for name, values, ref_values, expected in rounded:
        if name == "params" and dtype not in (torch.float16, torch.bfloat16):
            continue
        got_mismatch = mismatch_fraction(values, expected)
        ref_mismatch = mismatch_fraction(ref_values, expected)
        assert got_mismatch <= allowed_mismatch(ref_mismatch), (
            f"{backend}: {got_mismatch:.1%} of {name} differ from the rounded oracle "
            f"(reference: {ref_mismatch:.1%}); is the rounding right ({mode})?"
        )
    assert result.steps == [float(s.k) for s in oracle.params]
    # f_1 is one value, exactly the first loss taken (as the backend saw it), for every state.
    np.testing.assert_array_equal(
        result.initial_losses, [oracle.f1] * len(result.initial_losses))
    return got
