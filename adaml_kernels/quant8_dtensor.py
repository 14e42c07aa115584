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
from .tensor_checks import is_dtensor, local


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
    if not is_dtensor(p):
        return scale
    blocks = quant8.num_blocks(p.numel())
    return type(p).from_local(scale, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size([blocks]), stride=(1,))


def local_scales(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of saved block scales (a DTensor, or the whole parameter's) that p's shard
    holds."""
    if not is_dtensor(p):
        return value.full_tensor() if is_dtensor(value) else value
    if is_dtensor(value):
        if value.placements != p.placements or value.device_mesh != p.device_mesh:
            value = value.redistribute(p.device_mesh, p.placements)
        return local(value)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        torch.Size([quant8.num_blocks(p.numel())]), p.device_mesh, p.placements)
    return value[offset[0]:offset[0] + shape[0]]


def decode_moment(codes: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """quant8.decode_moment of codes and scales that may be DTensors (laid out alike, as AdamL
    saves them): each shard decoded on its own, as a DTensor like the codes."""
    if not is_dtensor(codes):
        return quant8.decode_moment(codes, local_scales(scale, codes), name)
    values = quant8.decode_moment(local(codes), local_scales(scale, codes), name)
    return type(codes).from_local(values, codes.device_mesh, codes.placements, run_check=False,
                                  shape=codes.shape, stride=codes.stride())
