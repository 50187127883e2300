"""Sharded (FSDP2) checkpoints: one directory per step, written with torch.distributed.checkpoint.

`step-00000123.dcp/` holds DCP's files (`.metadata`, one `.distcp` per rank), each training rank's
own `rank-00001.pt` (RNG, loss meter) and `manifest.json` (the loop's position and the sha256 of
every other file). Every rank writes into `step-00000123.dcp.tmp/`; once all have finished, rank 0
writes the manifest and renames the directory: a directory without `.tmp` is complete, and one
whose files do not match its manifest is corrupt. DCP stores every tensor with its global offsets,
so a checkpoint loads onto another number of ranks and into plain (ddp) tensors alike.
"""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from launcher.checkpoint.staging import snapshot_state
from launcher.files import Corrupt, atomic_write, file_sha256, fsync_dir, read_json, write_json
from launcher.rundir import checkpoint_name, checkpoint_pattern
from launcher.distributed.shards import is_sharded, local_slice

PATTERN = checkpoint_pattern(sharded=True)
MANIFEST = "manifest.json"
_JOINT = ("model", "optimizer")  # parts saved through get_state_dict: keyed by parameter name (FQN)
_ADDED = (("ema", "pending"),)  # (part, key) that older checkpoints lack


def dir_for(directory: Path, step: int) -> Path:
    return Path(directory) / checkpoint_name(step, sharded=True)


def steps(directory: Path) -> List[int]:
    """Steps with a complete (renamed) checkpoint directory, newest first; `.tmp` ones never count."""
    found = [int(m.group(1)) for p in Path(directory).glob("step-*.dcp") if (m := PATTERN.match(p.name))]
    return sorted(found, reverse=True)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ------------------------------------------------------------------------------------------ parts
def state_of(parts: Dict[str, Any]) -> Dict[str, Any]:
    """What a checkpoint holds of `parts`, as DCP saves it and as the template it loads into: model and
    optimizer from get_state_dict (names as keys, DTensors under fsdp, plain tensors under ddp), every
    other part its staging.snapshot_state(). A part without state (NoEMA) is left out."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out: Dict[str, Any] = {}
    if "model" in parts:
        out["model"], out["optimizer"] = get_state_dict(parts["model"], parts["optimizer"])
    for name, part in parts.items():
        if name not in _JOINT and (sd := snapshot_state(part)) is not None:
            out[name] = sd
    return out


class Live:
    """state_of(parts) for every save, fast. get_state_dict maps every parameter to its name anew on each
    call (~40 ms for a ViT-B: a third of the copy the snapshot exists for); the same dict comes from
    model.state_dict() (FSDP2 keys are the names already) and the optimizer's own state_dict() with its
    indices mapped to names once. The first call checks that both agree, key by key and tensor by tensor,
    and keeps using get_state_dict if they do not."""

    def __init__(self, parts: Dict[str, Any]):
        self.parts, self.names, self.agrees = parts, None, None

    def __call__(self) -> Dict[str, Any]:
        if self.agrees is False:
            return state_of(self.parts)
        model, opt = self.parts["model"], self.parts["optimizer"]
        self.names = self.names or _order(model, opt)
        sd = opt.state_dict()
        out = {"model": model.state_dict(),
               "optimizer": {"state": {self.names[i]: s for i, s in sd["state"].items()},
                             "param_groups": [{**g, "params": [self.names[i] for i in g["params"]]}
                                              for g in sd["param_groups"]]}}
        out.update({name: sd for name, part in self.parts.items()
                    if name not in _JOINT and (sd := snapshot_state(part)) is not None})
        if self.agrees is None:
            slow = state_of({name: self.parts[name] for name in _JOINT})
            self.agrees = _alike({name: out[name] for name in _JOINT}, slow)
            if not self.agrees:
                out.update(slow)
        return out


def _alike(a: Any, b: Any) -> bool:
    """The same nesting, keys and values; tensors the same memory (the same local shard)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or is_sharded(a) != is_sharded(b):
            return False
        la, lb = (t.to_local() if is_sharded(t) else t for t in (a, b))
        return la.data_ptr() == lb.data_ptr() and la.shape == lb.shape and a.shape == b.shape
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_alike(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_alike(x, y) for x, y in zip(a, b))
    return a == b


def apply(parts: Dict[str, Any], state: Dict[str, Any], full: bool = False) -> None:
    """Load `state` (state_of's template, filled) into `parts`; with `full`, a ddp .pt state instead:
    whole tensors, the optimizer keyed by index, of which each rank keeps its rows. The optimizer
    is loaded by torch's own load_state_dict, keyed by index (set_optimizer_state_dict mismatches
    the hyperparameters of the groups after an empty one: build_optimizer's groups may be empty)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model, opt = parts["model"], parts["optimizer"]
    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=full))
    opt.load_state_dict(_slices(model, opt, state["optimizer"]) if full else by_index(model, opt, state["optimizer"]))
    for name, part in parts.items():
        if name not in _JOINT:
            part.load_state_dict(state.get(name))


def _order(model: nn.Module, opt: torch.optim.Optimizer) -> List[str]:
    """Parameter names in the optimizer's index order (torch numbers them group after group)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]


def by_index(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state keyed by parameter name (get_state_dict's) keyed by index (torch's)."""
    index = {n: i for i, n in enumerate(_order(model, opt))}
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


@torch.no_grad()
def _slices(model: nn.Module, opt: torch.optim.Optimizer, full: dict) -> dict:
    """A full optimizer state (index keys) cut to this rank's rows of the sharded parameters."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    get_optimizer_state_dict(model, opt)  # creates the state (a zero step at lr 0) whose shards we fill
    own = opt.state_dict()
    for i, saved in full["state"].items():
        mine = own["state"][int(i)]
        for k, v in saved.items():
            like = mine.get(k)
            if isinstance(v, torch.Tensor) and isinstance(like, torch.Tensor):
                (like.to_local() if is_sharded(like) else like).copy_(local_slice(v, like))
            else:
                mine[k] = v
    return {"state": own["state"], "param_groups": full["param_groups"]}


# ------------------------------------------------------------------------------------------- save
def save(directory: Path, step: int, state: Dict[str, Any], own: dict, info: dict, dist, rank: int,
         before_commit: Callable[[], None] = lambda: None) -> Path:
    """Every training rank calls this with its shards (`state`) and its own per-rank parts (`own`);
    rank 0 commits. Raises OSError on every rank together when any rank failed (the partial
    directory is removed; the checkpoints before it are untouched). `info` goes into the manifest.
    `before_commit` runs on rank 0 once every rank's files are durable, before the manifest."""
    import torch.distributed.checkpoint as dcp

    final = dir_for(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            for stale in Path(directory).glob("step-*.dcp.tmp"):  # a save that died half-way
                shutil.rmtree(stale)
            tmp.mkdir()
        except OSError as e:
            error = e
    _agree(dist, error, "training rank 0 could not create " + tmp.name)
    try:
        buf = io.BytesIO()
        torch.save(own, buf)
        data = buf.getvalue()
        atomic_write(tmp / _rank_file(rank), lambda f: f.write(data))
    except OSError as e:
        error = e
    try:  # collective: DCP raises on every rank when any rank's write failed
        dcp.save(state, checkpoint_id=str(tmp), process_group=dist.group, no_dist=dist.group is None)
    except Exception as e:  # noqa: BLE001 - DCP wraps OSErrors in CheckpointException
        error = error or e
    failed = dist.any_rank(error is not None)
    if rank == 0 and not failed:
        try:
            before_commit()
            write_json(tmp / MANIFEST, {**info, "step": step, "files": checksums(tmp)})
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(directory)
        except OSError as e:
            error = e
    if rank == 0 and (failed or error is not None):
        shutil.rmtree(tmp, ignore_errors=True)
    _agree(dist, error, f"another training rank could not write its part of {final.name}")
    return final


def _agree(dist, error: Optional[BaseException], other: str) -> None:
    """Raise on every rank together when any training rank failed (collective)."""
    if dist.any_rank(error is not None):
        if isinstance(error, OSError):
            raise error
        raise OSError(f"{type(error).__name__}: {error}" if error else other)


def checksums(path: Path) -> Dict[str, dict]:
    """sha256 and size of every file in a checkpoint directory but the manifest."""
    out = {}
    for f in sorted(p for p in Path(path).iterdir() if p.is_file() and p.name != MANIFEST):
        out[f.name] = {"sha256": file_sha256(f), "bytes": f.stat().st_size}
    return out


# ------------------------------------------------------------------------------------------- load
def verify(path: Path) -> dict:
    """The manifest of a complete, intact checkpoint directory; files.Corrupt naming the first bad file."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise Corrupt(f"{path.name}: no {MANIFEST} (not completely written)")
    manifest = read_json(path / MANIFEST)
    have = checksums(path)
    for name, want in manifest["files"].items():
        if name not in have:
            raise Corrupt(f"{path.name}: {name} is missing")
        if (have[name]["sha256"], have[name]["bytes"]) != (want["sha256"], want.get("bytes", have[name]["bytes"])):
            raise Corrupt(f"{path.name}: {name}: sha256 checksum mismatch (file corrupt or truncated)")
    return manifest


def load_into(path: Path, state: Dict[str, Any], dist) -> None:
    """Fill the template `state` (state_of) from a checkpoint directory, in place: DTensors get this
    rank's rows whatever the saved number of ranks, plain tensors the whole tensor. Collective."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for part, key in _ADDED:  # a checkpoint from before a key was added: the template's value stays
        if f"{part}.{key}" not in saved and isinstance(state.get(part), dict):
            state[part].pop(key, None)
    dcp.load(state, checkpoint_id=str(path), process_group=dist.group, no_dist=dist.group is None)


def own_parts(path: Path, rank: int) -> Optional[dict]:
    """This rank's own parts (RNG, loss meter) as it saved them; None if it did not."""
    f = Path(path) / _rank_file(rank)
    return torch.load(f, weights_only=True) if f.exists() else None


def load_full(path: Path) -> dict:
    """The whole state of a checkpoint directory as full plain tensors, in one process without a
    process group (re-validation, inspection): {"model", "optimizer" (by name), "ema", ...} and the
    loop's position at the top level, like a .pt checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    manifest = verify(path)
    state: Dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return {**state, **manifest.get("train", {}), "train_world": manifest.get("train_world"),
            "wandb_id": manifest.get("wandb_id")}
