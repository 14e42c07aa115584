"""adaml_kernels: fused AdamL for PyTorch.

    from adaml_kernels import AdamL
    opt = AdamL(model.parameters(), lr=1e-3)
    loss.backward(); opt.step(loss); opt.zero_grad()
"""

from . import functional
from .backends import available_backends, unavailable_backends
from .functional import adaml_step_
from .optimizer import AdamL
from .state import dequantized_state_dict

__all__ = ["AdamL", "adaml_step_", "available_backends", "unavailable_backends", "functional",
           "dequantized_state_dict"]
__version__ = "0.1.0"
