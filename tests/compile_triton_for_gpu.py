"""Compile the Triton kernel for NVIDIA GPUs without one: `python compile_triton_for_gpu.py`.

Prints, per variant, the global load/store instructions of the generated PTX as JSON. Run in
a process without TRITON_INTERPRET, since the interpreter replaces the compiler.
"""

import itertools
import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from adaml_kernels.layout import CHUNK, L_MIN, TABLE_COLUMNS
from adaml_kernels.triton_kernel import adaml_kernel

POINTERS = ("rows_ptr", "chunk_tensor_ptr", "loss_ptr", "take_ptr", "lr_ptr", "grad_scale_ptr",
            "initial_loss_ptr", "telemetry_ptr")
POINTER_TYPES = ("*i64", "*i32", "*fp32", "*fp32", "*fp32", "*fp32", "*fp64", "*fp64")
FLOATS = ("lr", "beta1", "one_minus_beta1", "log_beta1", "beta2", "one_minus_beta2",
          "log_beta2", "eps", "gamma", "phi_hi", "phi_lo", "loss_offset_hi", "loss_offset_lo",
          "weight_decay")
INTS = ("seed_lo", "seed_hi")


def compile_variant(arch, param, aligned, features, moment=None):
    # features on: every switch, the low-precision modes (bf16 moments, stochastic rounding;
    # float32 gradients and master weights for half params) and telemetry. `moment`: another moment dtype.
    half = param in (tl.float16, tl.bfloat16)
    if moment is None:
        moment = tl.bfloat16 if features else tl.float32
    constexprs = dict(
        PARAM=param, GRAD=tl.float32 if features else param,
        MOMENT=moment, MASTER=features and half, SR=features,
        NORMALIZE=features, MAXIMIZE=features, DECAY_MODE=1 if features else 0,
        LR_IS_TENSOR=features, HAS_GRAD_SCALE=features, ALIGNED=aligned, CHUNK=CHUNK,
        COLUMNS=TABLE_COLUMNS, L_MIN=L_MIN, TELEMETRY=features,
    )
    signature = dict(zip(POINTERS, POINTER_TYPES))
    signature.update({name: "fp32" for name in FLOATS})
    signature.update({name: "i32" for name in INTS})
    signature.update({name: "constexpr" for name in constexprs})
    source = triton.compiler.ASTSource(fn=adaml_kernel, signature=signature, constexprs=constexprs)
    ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": 8}).asm["ptx"]
    return sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)))


def main():
    arches = [int(a) for a in sys.argv[1:]] or [80, 90]
    results = []
    for arch, (name, param), aligned in itertools.product(
        arches, [("float32", tl.float32), ("float16", tl.float16), ("bfloat16", tl.bfloat16)],
        [True, False],
    ):
        # Each constexpr flag is compiled both ways: all on with aligned data, all off without.
        features = aligned
        results.append(dict(arch=arch, dtype=name, aligned=aligned, features=features,
                            accesses=compile_variant(arch, param, aligned, features)))
    for arch, (name, param), features in itertools.product(
        arches, [("float32", tl.float32), ("bfloat16", tl.bfloat16)], [False, True]):
        # 8-bit moments: rounded to nearest with no switch on, stochastically with all on.
        results.append(dict(arch=arch, dtype=name, aligned=True, features=features,
                            moment="uint8", accesses=compile_variant(
                                arch, param, True, features, tl.uint8)))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
