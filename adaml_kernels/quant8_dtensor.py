"""8-bit moments of DTensor parameters (FSDP2, HSDP): the codes are DTensors like every other
moment, and the block scales are DTensors too, one scale per block of the whole parameter.

That needs each rank's shard to be whole blocks of the whole parameter: its first element's
index (in the flat parameter) and its size multiples of QUANT_BLOCK, but for the last shard,
which ends with the parameter. Then the blocks a rank cuts from its shard are the blocks one
process cuts from the whole parameter, a sharded run computes bitwise the codes and scales of one
process, and DCP reshards scales as it reshards codes: a 1-d tensor of num_blocks(p.numel())
scales with the parameter's placements. Shards that are not whole blocks (tensor parallel's
Shard(1), a row count that does not split into whole blocks) are refused with a clear error.
"""

from __future__ import annotations

import math

import torch

from . import quant8
from .layout import QUANT_BLOCK
from .tensor_checks import like_shard_of, local, shard_of


def check_sharding(p: torch.Tensor) -> None:
    """Raise ValueError unless every shard of the DTensor parameter p is whole blocks. Computed
    from p's global shape and placements only, so every rank decides alike."""
    placements = tuple(p.placements)
    shard_dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if any(not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0)) for pl in placements) \
            or len(shard_dims) > 1 or not p.is_contiguous():
        raise ValueError(
            f"8-bit moments (state_dtype=torch.uint8) of a DTensor parameter need it sharded "
            f"along dim 0 only (FSDP2's Shard(0), HSDP's (Replicate(), Shard(0))), got "
            f"placements {placements}; use state_dtype=torch.bfloat16 or None for it")
    if not shard_dims:
        return
    shards = p.device_mesh.size(shard_dims[0])
    row = math.prod(p.shape[1:])
    rows = -(-p.shape[0] // shards)  # the rows of every shard but the last ones
    if rows * row % QUANT_BLOCK:
        raise ValueError(
            f"8-bit moments of a DTensor parameter need each shard to be whole blocks of "
            f"{QUANT_BLOCK} elements: shape {tuple(p.shape)} in {shards} shards has {rows} rows "
            f"of {row} elements ({rows * row}) per shard; use state_dtype=torch.bfloat16 or "
            "None, or a size whose shards are whole blocks")


def scales_like_param(scale: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A shard's block scales as p's state holds them: for a DTensor p, the DTensor of the whole
    parameter's num_blocks(p.numel()) scales with p's mesh and placements."""
    return like_shard_of(scale, p, (quant8.num_blocks(p.numel()),), (1,))


def local_scales(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of saved block scales (a DTensor, or the whole parameter's) that p's shard
    holds."""
    return shard_of(value, p, (quant8.num_blocks(p.numel()),))


def decode_moment(codes: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """quant8.decode_moment of codes and scales that may be DTensors (laid out alike, as AdamL
    saves them): each shard decoded on its own, as a DTensor like the codes."""
    values = quant8.decode_moment(local(codes), local_scales(scale, codes), name)
    return like_shard_of(values, codes)
