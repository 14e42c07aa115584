"""python -m adaml_kernels.bench: the adaml-bench command line."""

import sys

from .cli import main

sys.exit(main())
