"""Where a state tensor's local part sits in the full tensor, for sharded (FSDP2) training.

FSDP2 shards every parameter along dim 0 (torch.chunk over the ranks: the last ranks may hold
fewer rows, or none). Buffers stay plain, replicated tensors. Everything that moves shards
around (the sharded EMA, the hand-off, checkpoints, the validator's assembly) describes a piece
by its `Layout`, so a piece written by one world size can be placed by any reader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch


@dataclass(frozen=True)
class Layout:
    """A piece of a full tensor of `shape`: rows [offset, offset + rows) along dim 0."""
    shape: Tuple[int, ...]
    offset: int
    rows: int

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "offset": self.offset, "rows": self.rows}

    @staticmethod
    def from_json(d: dict) -> "Layout":
        return Layout(tuple(int(s) for s in d["shape"]), int(d["offset"]), int(d["rows"]))


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `t`'s whole value: a DTensor's `full_tensor()` (which reduces a Partial value,
    such as the norm of sharded gradients, and gathers a Shard one), else `t` itself."""
    return t.full_tensor() if is_sharded(t) else t


def local_and_layout(t: torch.Tensor) -> Tuple[torch.Tensor, Optional[Layout]]:
    """The local tensor of `t` and its Layout; (t, None) for a plain (replicated) tensor."""
    if not is_sharded(t):
        return t, None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if any(not isinstance(p, Shard) or p.dim != 0 for p in t.placements):
        raise ValueError(f"only dim-0 sharding is supported, got placements {t.placements}")
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local()
    rows = local_shape[0] if len(local_shape) else 0
    return local, Layout(tuple(t.shape), int(offset[0]) if len(offset) else 0, int(rows))


def assemble(pieces: Iterable[Tuple[torch.Tensor, Layout]], device: "torch.device | str" = "cpu") -> torch.Tensor:
    """The full tensor from its pieces (any world size). Raises ValueError if rows are missing or overlap."""
    pieces = sorted(pieces, key=lambda p: p[1].offset)
    if not pieces:
        raise ValueError("no pieces")
    shape = pieces[0][1].shape
    full = torch.empty(shape, dtype=pieces[0][0].dtype, device=device)
    covered = 0
    for local, lay in pieces:
        if lay.shape != shape or lay.offset != covered or tuple(local.shape[:1]) != (lay.rows,) and lay.rows:
            raise ValueError(f"pieces of a {tuple(shape)} tensor do not tile dim 0 (at row {covered}: {lay})")
        if lay.rows:
            full[lay.offset:lay.offset + lay.rows].copy_(local)
        covered += lay.rows
    if covered != (shape[0] if len(shape) else 0):
        raise ValueError(f"pieces of a {tuple(shape)} tensor cover {covered} rows")
    return full


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of a full tensor that `like` (a sharded tensor of the same shape) holds on this rank;
    `full` itself for a plain `like`. Loads a full (ddp) state into sharded tensors."""
    _, lay = local_and_layout(like)
    return full if lay is None else full[lay.offset:lay.offset + lay.rows]
