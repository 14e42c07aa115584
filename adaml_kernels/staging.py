"""Parameters that the fused kernels cannot walk in place, under a fused backend asked for by
name: a parameter that is not dense (a strided view of a larger tensor, such as
`Parameter(base[..., 0])`) is updated through dense copies.

The fused kernels walk each tensor as one flat array from its data pointer. Such a parameter's
moments and master weight are contiguous already (plan.moment_stride), so each step copies the
parameter and its gradient to contiguous tensors, runs the kernel on those and copies the
parameter back. The update is element-wise, so this is bitwise the update in place (and, as
its elements are walked in row-major order, stochastic rounding hashes the indices the
reference backend uses). It costs a transient copy of these tensors and a pointer table built
at every step, and a plan with such a bucket takes the general path.
"""

from __future__ import annotations

import torch

from .buckets import Bucket, is_dense


def needs_staging(p: torch.Tensor) -> bool:
    """Whether a fused backend updates p (the local tensor) through dense copies."""
    return not is_dense(p)


@torch.no_grad()
def step(step_function, bucket: Bucket, hp, inputs) -> None:
    """One launch of `step_function` over dense copies of the bucket's parameters and
    gradients; the parameters are then copied back (which bumps their versions)."""
    params = [p.contiguous() for p in bucket.params]
    dense = Bucket(
        params, [g.contiguous() for g in bucket.grads], bucket.exp_avgs, bucket.exp_avg_sqs,
        bucket.steps, master_params=bucket.master_params, param_indices=bucket.param_indices,
        element_offsets=bucket.element_offsets, stochastic_rounding=bucket.stochastic_rounding,
        seed=bucket.seed)
    dense.telemetry = bucket.telemetry  # (the same rows: one per chunk of the same tensors)
    step_function(dense, hp, inputs)
    for p, updated in zip(bucket.params, params):
        p.copy_(updated)
