"""A small GPT-style byte-level language model, its data and its parallel plans, for train_gpt.py.

The model is a stack of pre-norm transformer blocks (causal self-attention, then an MLP) over
byte tokens (vocabulary 256). Attention infers its number of heads from the width of the local
q/k/v projections, so the same code runs whole or with heads split over a tensor-parallel group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # bytes


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.head_dim = d_model // n_head
        self.q, self.k, self.v = (nn.Linear(d_model, d_model) for _ in range(3))
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism the projections hold this rank's heads only.
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn, self.mlp = Attention(d_model, n_head), MLP(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, d_model: int, layers: int, seq_len: int, n_head: int | None = None):
        super().__init__()
        n_head = n_head or max(1, d_model // 16)
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not a multiple of {n_head} heads")
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.apply(_init)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _init(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def load_bytes() -> torch.Tensor:
    """The help texts that ship with Python (pydoc_data.topics, ~466 kB) as a uint8 tensor."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def batch(data: torch.Tensor, step: int, seed: int, batch_size: int, seq_len: int,
          rank: int = 0, ranks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of `step`: a function of (seed, step) alone, so a
    resumed run sees the batches the uninterrupted run saw, whatever the number of ranks."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
    per = batch_size // ranks
    starts = starts[rank * per:(rank + 1) * per]
    w = data[starts[:, None] + torch.arange(seq_len + 1)].long()
    return w[:, :-1], w[:, 1:]


def apply_tp(model: GPT, tp_mesh) -> None:
    """Megatron-style tensor parallelism: q/k/v and the MLP's first layer split by columns
    (heads, hidden units), the two output projections by rows (their outputs all-reduced).

    Embeddings, layer norms and the head stay whole; their gradients are the same on every rank
    of tp_mesh, since every rank of a TP group sees the same activations.
    """
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, parallelize_module,
    )

    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(), "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, tp_mesh, plan)


def apply_fsdp(model: GPT, dp_mesh) -> None:
    """FSDP2: each block is one all-gather unit, the root holds the rest (embeddings, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
