import os
import sys

import torch

# Without a GPU the Triton backend runs on the CPU interpreter. It reads this variable when the
# kernel module is imported, so it is set before any test imports adaml_kernels' Triton code.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (oracle, tolerances)
