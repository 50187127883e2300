"""Sharded hand-off snapshots (train.strategy=fsdp): one piece per training rank, one commit.

Every training rank writes its local shards (rank 0 also the replicated tensors, e.g. BatchNorm
buffers) to `<step>.shard-<rank>-of-<world>.safetensors`; each piece carries the `shards.Layout`
of every sharded tensor in its safetensors metadata, so its sha256 covers them too.

The commit needs no collective. Once its piece is in place (atomic rename), a rank takes the first
free *ticket* `<step>.ticket-<k>-of-<world>` (a hard link: created whole, and only once), whose
content describes its piece (file, sha256, bytes). Tickets are taken in order, one per rank, so the
rank that gets ticket world-1 is the last one to finish and the only one that publishes the
snapshot's manifest `<step>.json` (with every piece in it), after which it removes the tickets.
A second publication of a step is therefore impossible, even when the validator has already
validated and deleted the first one.

A step whose pieces never all arrive (a rank skipped it: busy writer, out of memory, or it
crashed) is *incomplete*; `sweep()` removes its pieces once a newer snapshot is complete (each
rank writes its pieces in step order, so nothing older can complete after that), and rank 0's
writer removes every incomplete leftover of a previous session at startup.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load as st_load

from launcher.files import atomic_write, fsync_dir, read_json, verify, write_json, write_safetensors
from launcher.rundir import SNAPSHOT_PIECE, Manifest, piece_name, snapshot_name, step_stem, ticket_name
from launcher.distributed.shards import Layout, assemble, is_sharded, local_and_layout


def piece_path(directory: Path, step: int, rank: int, world: int) -> Path:
    return Path(directory) / piece_name(step, rank, world)


def ticket_path(directory: Path, step: int, k: int, world: int) -> Path:
    return Path(directory) / ticket_name(step, k, world)


def pieces_of(directory: Path, step: int) -> List[Path]:
    """Every piece file of a step still in the queue (not the ones moved aside as .bad)."""
    return sorted(Path(directory).glob(piece_name(step, "*", "*")))


def local_state(flat: Dict[str, torch.Tensor], rank: int, cache: Dict[str, Layout]
                ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Layout]]:
    """This rank's part of a flat state: the local tensor of every sharded one (with its Layout),
    and the replicated (plain) tensors on rank 0 only (they are the same on every rank).
    `cache`: the Layouts of earlier calls; computing them anew costs ~0.1 ms a tensor (ViT-B: ~20 ms,
    on the training thread), taking the local tensors ~2 ms."""
    local, layouts = {}, {}
    for key, t in flat.items():
        if not is_sharded(t):
            if rank == 0:
                local[key] = t.detach()
            continue
        piece, lay = t.to_local().detach(), cache.get(key)
        if lay is None or lay.shape != tuple(t.shape) or lay.rows != (piece.shape[0] if piece.ndim else 0):
            piece, lay = local_and_layout(t)
            cache[key] = lay
        local[key], layouts[key] = piece, lay
    return local, layouts


def write_piece(directory: Path, step: int, epoch: int, kinds: List[str], host: Dict[str, torch.Tensor],
                layouts: Dict[str, Layout], rank: int, world: int) -> Optional[dict]:
    """Write this rank's piece, then take a ticket. Returns the manifest fields to publish when this
    rank was the last of the `world` ranks to finish (the caller publishes them), else None."""
    path = piece_path(directory, step, rank, world)
    meta = {"step": str(step), "epoch": str(epoch), "weights": ",".join(kinds), "rank": str(rank),
            "world": str(world), "layouts": json.dumps({k: v.to_json() for k, v in layouts.items()})}
    out: list = []
    atomic_write(path, lambda f: out.append(write_safetensors(f, host, meta)))
    (sha256, size), = out
    tmp = Path(directory) / f".{step_stem(step)}.ticket.rank-{rank}.tmp"
    write_json(tmp, {"rank": rank, "file": path.name, "sha256": sha256, "bytes": size})
    try:
        k = 0
        while True:  # the first free ticket: os.link fails if it exists, so each k goes to one rank
            try:
                os.link(tmp, ticket_path(directory, step, k, world))
                break
            except FileExistsError:
                k += 1
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(directory)
    if k != world - 1:  # not the last (k >= world: a duplicate put of this step; the first one counts)
        return None
    tickets = [ticket_path(directory, step, i, world) for i in range(world)]
    pieces = sorted((read_json(t) for t in tickets), key=lambda p: p["rank"])
    digest = hashlib.sha256("".join(p["sha256"] for p in pieces).encode()).hexdigest()
    return {"file": piece_name(step, "*", world), "sha256": digest,
            "bytes": sum(p["bytes"] for p in pieces), "world": world, "pieces": pieces, "tickets": tickets}


def write_and_publish(directory: Path, step: int, epoch: int, kinds: List[str], host: Dict[str, torch.Tensor],
                      layouts: Dict[str, Layout], rank: int, world: int) -> bool:
    """write_piece(), then, on the rank that completed the snapshot, its manifest `<step>.json`; the
    tickets go, and so do the older incomplete steps. True when this rank published it."""
    last = write_piece(directory, step, epoch, kinds, host, layouts, rank, world)
    if last is None:
        return False
    tickets = last.pop("tickets")
    base = Manifest(step, epoch, kinds, last.pop("file"), last.pop("sha256"), last.pop("bytes"), time.time())
    write_json(Path(directory) / snapshot_name(step, "json"), {**vars(base), **last})
    for ticket in tickets:
        ticket.unlink(missing_ok=True)
    sweep(directory, below=step)  # every rank is past the older steps: incomplete ones stay so
    return True


def _layouts(data: bytes) -> Dict[str, Layout]:
    """The Layouts a piece's safetensors header carries in its metadata."""
    (n,), = [struct.unpack("<Q", data[:8])]
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return {k: Layout.from_json(v) for k, v in json.loads(meta.get("layouts", "{}")).items()}


def load(directory: Path, manifest: dict, device: "torch.device | str" = "cpu") -> Dict[str, torch.Tensor]:
    """The full flat state of a sharded snapshot from all its pieces, each verified against the
    manifest (size, sha256). Raises files.Corrupt (a ValueError) or OSError with a one-line reason."""
    world, pieces = int(manifest["world"]), manifest["pieces"]
    missing = sorted(set(range(world)) - {int(p["rank"]) for p in pieces})
    if missing or len(pieces) != world:
        raise ValueError(f"the manifest lists {len(pieces)} of {world} pieces (missing ranks {missing})")
    local: Dict[str, List[Tuple[torch.Tensor, Layout]]] = {}
    full: Dict[str, torch.Tensor] = {}
    for p in pieces:
        try:
            data = (Path(directory) / p["file"]).read_bytes()
        except FileNotFoundError:
            raise ValueError(f"piece of rank {p['rank']} missing: {p['file']}") from None
        verify(data, p["sha256"], p["bytes"], f"piece of rank {p['rank']} ({p['file']})")
        try:
            tensors, layouts = st_load(data), _layouts(data)
        except Exception as e:
            raise ValueError(f"piece of rank {p['rank']} is not a safetensors file: {e}") from None
        for key, t in tensors.items():
            if key in layouts:
                local.setdefault(key, []).append((t, layouts[key]))
            else:
                full[key] = t.to(device)
    for key, parts in local.items():
        try:
            full[key] = assemble(parts, device)
        except RuntimeError as e:  # a piece whose trailing dims do not fit the full shape
            raise ValueError(f"{key}: pieces do not fit: {str(e).splitlines()[0]}") from None
    return full


def sweep(directory: Path, below: Optional[int] = None) -> None:
    """Remove the pieces and tickets of incomplete steps (no `.json` / `.claimed` manifest) older
    than `below`: once a newer step is complete, they never will be. below=None: every one (rank 0,
    at startup, before any rank of this session has written a piece)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        m = SNAPSHOT_PIECE.match(name)
        if not m or (below is not None and int(m.group(1)) >= below):
            continue
        if any((Path(directory) / f"{m.group(1)}.{s}").exists() for s in ("json", "claimed")):
            continue
        (Path(directory) / name).unlink(missing_ok=True)
