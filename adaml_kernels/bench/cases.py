"""Workloads: the cases a run measures and the shapes of their parameters."""

from __future__ import annotations

import argparse
import math
import random
import re
from dataclasses import dataclass

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
LIST_NAMES = ("gpt2", "many_small")
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "B": 1 << 30}


@dataclass
class Case:
    """One workload: the shapes of one model's parameters."""

    kind: str  # "sweep" (one tensor of a given size) or "list" (a realistic parameter list)
    name: str  # "1M", "gpt2_small", "many_small", ...
    shapes: list[tuple[int, ...]]

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def max_numel(self) -> int:
        return max(math.prod(s) for s in self.shapes)


def size_label(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def parse_size(text: str) -> int:
    """'1M' -> 2**20, '1B'/'1G' -> 2**30, '4096', '1e6' -> 1000000."""
    t = text.strip().upper().replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?)([KMGB]?)", t)
    if m:
        value = float(m.group(1)) * SIZE_UNITS[m.group(2)]
    else:
        try:
            value = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 1M, 1e6)")
    n = int(round(value))
    if n < 1:
        raise argparse.ArgumentTypeError(f"size must be >= 1: {text!r}")
    return n


def gpt2_small_shapes(n_layer=12, d=768, vocab=50257, ctx=1024) -> list[tuple[int, ...]]:
    """GPT-2 small's parameters (Hugging Face layout, lm_head tied to wte): 148 tensors, 124M."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),  # ln_1
            (d, 3 * d), (3 * d,),  # attn.c_attn
            (d, d), (d,),  # attn.c_proj
            (d,), (d,),  # ln_2
            (d, 4 * d), (4 * d,),  # mlp.c_fc
            (4 * d, d), (d,),  # mlp.c_proj
        ]
    return shapes + [(d,), (d,)]  # ln_f


def many_small_shapes(n=5000, seed=0) -> list[tuple[int, ...]]:
    """n small tensors, a deterministic mix like a deep conv net / many small layers:

    60% vectors (biases, norm weights) of 64..6144 elements (channel counts 2^k and 1.5 * 2^k),
    30% matrices of 16..128 x 16..256, 10% 3x3 conv kernels of 8..64 x 8..64 channels.
    With n=5000: 16,983,936 parameters, median tensor 1,536 elements.
    """
    rng = random.Random(seed)
    shapes: list[tuple[int, ...]] = []
    for i in range(n):
        r = i % 10
        if r < 6:
            shapes.append((int(2 ** rng.randint(6, 12) * rng.choice((1, 1.5))),))
        elif r < 9:
            shapes.append((rng.choice((16, 32, 64, 128)), rng.choice((16, 32, 64, 128, 256))))
        else:
            shapes.append((rng.choice((8, 16, 32, 64)), rng.choice((8, 16, 32, 64)), 3, 3))
    return shapes


def list_cases(names, smoke=False) -> list[Case]:
    cases = []
    for name in names:
        if name == "gpt2":
            shapes = gpt2_small_shapes(2, 32, 500, 64) if smoke else gpt2_small_shapes()
            cases.append(Case("list", "gpt2_small", shapes))
        elif name == "many_small":
            cases.append(Case("list", "many_small", many_small_shapes(100 if smoke else 5000)))
        else:
            raise ValueError(f"unknown list {name!r}; choose from {LIST_NAMES}")
    return cases


def sweep_cases(sizes) -> list[Case]:
    return [Case("sweep", size_label(n), [(n,)]) for n in sizes]


def default_sizes(device: torch.device, quick: bool) -> list[int]:
    M = 1 << 20
    if device.type == "cuda":
        return [M, 16 * M, 256 * M] if quick else [M, 4 * M, 16 * M, 64 * M, 256 * M, 1024 * M]
    return [M, 4 * M, 16 * M] if quick else [M, 2 * M, 4 * M, 8 * M, 16 * M, 32 * M, 64 * M]
