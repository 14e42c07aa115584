"""What the fused kernels read, described once for Python and Triton.

- The pointer table: one row of TABLE_COLUMNS int64 per tensor (see buckets.py), in chunks of
  CHUNK elements.
- The dtype codes of the tensors the kernels read element by element.
- The stochastic-rounding hash's constants (precision.py), and the 8-bit moments' block size.
- A launch's values: `Hyper` (float[] in the op schemas) and `Config` (int[]).
- The columns of a telemetry buffer (`Figure`): what a launch with telemetry counts.

The C++ and CUDA copy is csrc/adaml_update.h; the op adaml_kernels::layout_constants returns
it, and tests/test_layout.py checks that it agrees with this module and with triton_kernel.py.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import torch

CHUNK = 2048
VECTOR_BYTES = 16  # 16-byte vector loads where every address of a table is this aligned
L_MIN = 1e-12  # floor of the scaled loss l and of the normalisation scale


class Column(IntEnum):
    PARAM = 0  # addresses
    GRAD = 1
    EXP_AVG = 2
    EXP_AVG_SQ = 3
    STEP = 4  # float32, 0-dim: the step count k, already advanced
    MASTER = 5  # float32 master weight; 0: none
    NUMEL = 6
    FIRST_CHUNK = 7  # index of the tensor's first chunk
    PARAM_INDEX = 8  # the parameter's index in the optimizer (stochastic rounding's j)
    ELEMENT_OFFSET = 9  # index, in the whole parameter, of this tensor's first element
    EXP_AVG_SCALE = 10  # 8-bit moments: float32 scales, one per QUANT_BLOCK elements; 0: none
    EXP_AVG_SQ_SCALE = 11


TABLE_COLUMNS = len(Column)
# Columns whose 16-byte alignment decides vector loads.
ADDRESS_COLUMNS = (Column.PARAM, Column.GRAD, Column.EXP_AVG, Column.EXP_AVG_SQ, Column.MASTER)

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3,
               torch.uint8: 4}  # uint8: 8-bit moments (quant8.py)

# 8-bit moments (quant8.py): elements per block scale, and the smallest tensor they apply to.
QUANT_BLOCK = 256
MIN_8BIT_NUMEL = 4096
QUANT_MANTISSA_BITS = 3  # 8-bit codes' mantissa bits
QUANT_RANDOM_BITS = 23 - QUANT_MANTISSA_BITS  # stochastic rounding's random bits per code



class Figure(IntEnum):
    """The columns of a bucket's telemetry buffer (telemetry.py): float64 [rows, FIGURES], one
    row per chunk (fused kernels) or per tensor (reference), summed over the rows."""

    SGD_LIKE = 0  # elements with eps * l >= (1 - b2) g^2 / (gamma l^phi)
    SQUARED_CHANGE = 1  # sum of (p_new - p_old)^2 of the parameter as stored
    LOST = 2  # fp16/bf16 elements with a nonzero update whose stored value did not change
    SATURATED = 3  # elements whose w saturated at the moment dtype's largest finite value


FIGURES = len(Figure)

# The hash of stochastic rounding (precision.py has the definition).
MIX_1 = 0x21F0AAAD
MIX_2 = 0x735A2D97
SEED_SALT = 0x9E3779B9
SQ_STREAM = 0x6A09E667


class Hyper(NamedTuple):
    """A launch's float values, in their order in the ops' `float[] hyper`. Flags are 0.0/1.0;
    lr is ignored when an lr tensor is given."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    gamma: float
    phi: float
    loss_offset: float
    weight_decay: float
    normalize_loss: float
    decoupled_weight_decay: float
    maximize: float


class Config(NamedTuple):
    """A bucket's fixed launch values, in their order in the ops' `int[] config`."""

    param_dtype: int  # DTYPE_CODES
    grad_dtype: int
    moment_dtype: int
    master: int  # 1: master weights (float32)
    stochastic_rounding: int
    seed: int  # the 64-bit seed as the int64 with the same bits


def signed_seed(seed: int) -> int:
    """A seed in [0, 2**64) as the int64 with the same bits (the ops' `int` is int64)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def constants() -> dict[str, int]:
    """The values csrc/adaml_update.h must hold too (adaml_kernels::layout_constants)."""
    out = {"chunk": CHUNK, "columns": TABLE_COLUMNS, "vector_bytes": VECTOR_BYTES,
           "hyper_fields": len(Hyper._fields), "config_fields": len(Config._fields),
           "mix_1": MIX_1, "mix_2": MIX_2, "seed_salt": SEED_SALT, "sq_stream": SQ_STREAM,
           "quant_block": QUANT_BLOCK, "min_8bit_numel": MIN_8BIT_NUMEL,
           "quant_mantissa_bits": QUANT_MANTISSA_BITS, "quant_random_bits": QUANT_RANDOM_BITS,
           "figures": FIGURES}
    out.update({f"figure_{f.name.lower()}": int(f) for f in Figure})
    out.update({f"column_{c.name.lower()}": int(c) for c in Column})
    out.update({f"dtype_{str(d).removeprefix('torch.')}": code for d, code in DTYPE_CODES.items()})
    out.update({f"hyper_{name}": i for i, name in enumerate(Hyper._fields)})
    out.update({f"config_{name}": i for i, name in enumerate(Config._fields)})
    return out
