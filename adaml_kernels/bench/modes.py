"""AdamL's low-precision modes (and telemetry) as the benchmark measures them: options, and bytes
per parameter.

    default          AdamL as constructed plainly: float32 moments, rounding to nearest
    sr               stochastic_rounding=True                          (bf16 parameters)
    master           master_weights=True: a float32 copy per parameter (fp16/bf16 parameters)
    bf16m            state_dtype=torch.bfloat16: bf16 moments          (fp32/fp16/bf16)
    bf16m+sr         bf16 moments, stochastic rounding                 (fp32/bf16)
    master+bf16m+sr  all three                                         (fp16/bf16)
    8bit             state_dtype=torch.uint8: 8-bit moments            (fp32/fp16/bf16)
    telemetry        telemetry=True: the kernels also measure (docs/telemetry.md); every dtype

Traffic (each array read once and written once): read the gradient, the parameter (or its
float32 master weight) and both moments; write the parameter, the master weight and both
moments. bf16 parameters: default 22 B, sr 22 B, master 28 B, bf16m 14 B, master+bf16m 20 B;
float32 parameters: default 28 B, bf16m 20 B. An 8-bit moment is 1 B per parameter plus a float32
scale per 256 (quant8.py): 1.015625 B, so 8bit moves 16.06 B on float32 parameters and 10.06 B on
bf16 ones. Telemetry moves the default's bytes (plus 32 B per 2048-element chunk, not
counted). (Tensors below MIN_8BIT_NUMEL = 4096 elements keep float32 moments; the model counts
8 bits for all, so it overstates the saving on small tensors and lists of them.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layout import QUANT_BLOCK

HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Mode:
    name: str
    options: dict = field(default_factory=dict)  # AdamL keyword arguments
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def applies(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes

    def moment_bytes(self, dtype: torch.dtype) -> float:
        if dtype == torch.float64:
            return 8
        state = self.options.get("state_dtype")
        if state == torch.uint8:
            return 1 + 4 / QUANT_BLOCK  # a code, and a share of its block's scale
        return 2 if state == torch.bfloat16 else 4

    def master(self, dtype: torch.dtype) -> bool:
        return bool(self.options.get("master_weights")) and dtype in HALF

    def traffic(self, dtype: torch.dtype) -> float:
        """Bytes per parameter and step."""
        ps = torch.empty((), dtype=dtype).element_size()
        ms = self.moment_bytes(dtype)
        x = 4 if self.master(dtype) else 0
        reads = ps + (x if x else ps) + 2 * ms  # grad, param or master, moments
        writes = ps + x + 2 * ms
        return reads + writes

    def traffic_text(self, dtype: torch.dtype) -> str:
        ps = torch.empty((), dtype=dtype).element_size()
        ms = self.moment_bytes(dtype)
        if self.master(dtype):
            return f"read {ps}+4+{ms:g}+{ms:g}, write {ps}+4+{ms:g}+{ms:g}"
        return f"read {ps}+{ps}+{ms:g}+{ms:g}, write {ps}+{ms:g}+{ms:g}"


BF16 = torch.bfloat16
MODES = {
    m.name: m for m in (
        Mode("default"),
        Mode("sr", dict(stochastic_rounding=True), (BF16,)),
        Mode("master", dict(master_weights=True), HALF),
        Mode("bf16m", dict(state_dtype=BF16), (torch.float32,) + HALF),
        Mode("bf16m+sr", dict(state_dtype=BF16, stochastic_rounding=True),
             (torch.float32, BF16)),
        Mode("master+bf16m+sr",
             dict(master_weights=True, state_dtype=BF16, stochastic_rounding=True), HALF),
        Mode("8bit", dict(state_dtype=torch.uint8), (torch.float32,) + HALF),
        Mode("telemetry", dict(telemetry=True)),
    )
}
DEFAULT = MODES["default"]
