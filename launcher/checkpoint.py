"""Checkpoints: atomic, checksummed, last K kept, newest valid one found on resume.

`step-00000123.pt` holds the full training state; `step-00000123.json` beside it
holds its sha256 and is written after it, so a checkpoint whose manifest exists
was completely written. A sharded (fsdp) run writes `step-00000123.dcp/` instead
(checkpoint_dcp.py); retention and resume count both kinds alike, and either kind
loads into either strategy. Retention runs only after a save succeeded: a failed
save (disk full, read-only directory) never costs the previous checkpoint.

`Checkpointer` owns what a checkpoint holds: one table of parts, read by save and
by restore alike, so the two cannot drift apart. Deployable weights (safetensors)
are written here too.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from launcher import checkpoint_dcp, fsdp
from launcher.batch import Batch
from launcher.dist import rng_state, seed_everything, set_rng_state
from launcher.files import atomic_write, read_json, write_json

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^step-(\d+)\.pt$")


def _pt(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def path_for(directory: Path, step: int) -> Path:
    """The checkpoint of `step`: its .dcp directory when a sharded run wrote one, else the .pt file."""
    sharded = checkpoint_dcp.dir_for(directory, step)
    return sharded if sharded.is_dir() else _pt(directory, step)


class SaveError(RuntimeError):
    """A checkpoint could not be written; the previous ones are untouched."""


def save(directory: Path, step: int, state: dict, keep_last: int, protect: Iterable[int] = ()) -> Path:
    directory = Path(directory)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    path = _pt(directory, step)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
        write_json(path.with_suffix(".json"), {"step": step, "sha256": hashlib.sha256(data).hexdigest(),
                                               "bytes": len(data)})
    except OSError as e:
        if path.exists() and not path.with_suffix(".json").exists():
            try:  # written but not confirmed: a half-made checkpoint must not look like the newest one
                path.unlink()
            except OSError:
                pass
        raise SaveError(f"could not save checkpoint {path} ({len(data) / 2**20:.1f} MiB): "
                        f"{e.strerror or e}; {_intact(directory, step)}") from e
    shutil.rmtree(checkpoint_dcp.dir_for(directory, step), ignore_errors=True)  # one checkpoint per step
    prune(directory, keep_last, protect)
    return path


def _intact(directory: Path, step: int) -> str:
    older = [s for s in steps(directory) if s != step]
    return f"the previous checkpoint {path_for(directory, older[0]).name} is intact" if older \
        else "no earlier checkpoint exists"


def save_sharded(directory: Path, step: int, state: dict, own: dict, info: dict, dist, rank: int,
                 keep_last: int, protect: Iterable[int] = ()) -> Path:
    """save() for a sharded state: every training rank calls it (checkpoint_dcp.save); SaveError on all."""
    try:
        path = checkpoint_dcp.save(directory, step, state, own, info, dist, rank)
    except OSError as e:
        raise SaveError(f"could not save checkpoint {checkpoint_dcp.dir_for(directory, step)}: "
                        f"{e.strerror or e}; {_intact(directory, step)}") from e
    if rank == 0:
        _pt(directory, step).unlink(missing_ok=True)  # one checkpoint per step
        _pt(directory, step).with_suffix(".json").unlink(missing_ok=True)
        prune(directory, keep_last, protect)
    return path


def steps(directory: Path) -> List[int]:
    """Checkpointed steps (.pt files and complete .dcp directories), newest first."""
    found = {int(m.group(1)) for p in Path(directory).glob("step-*.pt") if (m := PATTERN.match(p.name))}
    return sorted(found | set(checkpoint_dcp.steps(directory)), reverse=True)


def prune(directory: Path, keep_last: int, protect: Iterable[int] = ()) -> None:
    protect = set(protect)
    for step in steps(directory)[keep_last:]:
        if step not in protect:
            path = _pt(directory, step)
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            shutil.rmtree(checkpoint_dcp.dir_for(directory, step), ignore_errors=True)


def load(path: Path, map_location: Any = "cpu") -> dict:
    """Load one checkpoint, verifying its checksum when the manifest is there. A .dcp directory loads
    whole, as full tensors (its optimizer state keyed by parameter name)."""
    if Path(path).is_dir():
        return checkpoint_dcp.load_full(path)
    data = Path(path).read_bytes()
    manifest = Path(path).with_suffix(".json")
    if manifest.exists():
        want = read_json(manifest)["sha256"]
        if hashlib.sha256(data).hexdigest() != want:
            raise ValueError(f"{path.name}: checksum mismatch (file corrupt or truncated)")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def load_latest(directory: Path, map_location: Any = "cpu") -> Tuple[Optional[Path], Optional[dict], List[str]]:
    """The newest checkpoint that loads; also the reasons the newer ones were skipped. A .dcp directory
    is only verified (data None): its shards are loaded by every rank into its own template."""
    skipped = []
    for step in steps(directory):
        path = path_for(directory, step)
        try:
            if path.is_dir():
                checkpoint_dcp.verify(path)
                return path, None, skipped
            return path, load(path, map_location), skipped
        except Exception as e:  # a corrupt file must never stop a resume
            reason = f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("skipping unreadable checkpoint %s", reason)
            skipped.append(reason)
    return None, None, skipped


def save_weights(path: Path, state: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """A deployable safetensors file, written atomically."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = st_save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda f: f.write(data))


@dataclass
class TrainState:
    """Where the loop is. `batch` changes only by OOM recovery; autobatch.json carries it across a resume."""
    batch: Batch
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "micro_batch": self.batch.micro, "accum": self.batch.accum}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]


class _RNG:
    """Every RNG of this process (of its own CUDA device only), as a part."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        return rng_state(self.device)

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state, self.device)


class Checkpointer:
    """Save and restore of the whole training state.

    `parts` (model, optimizer, scheduler, scaler, EMA) are training rank 0's, saved once and loaded
    by every rank; `state` (the loop's position) is stored at the top level. `per_rank` parts (RNG,
    the loss meter) are gathered from every training rank, and each rank takes its own back.
    With a fully_shard-ed model (fsdp) every rank saves its own shards of every part into one .dcp
    directory; restore loads either kind into either strategy."""

    def __init__(self, cfg, env, dist, rundir, tel, state: TrainState, parts: Dict[str, Any],
                 per_rank: Dict[str, Any]):
        self.cfg, self.env, self.dist, self.rundir, self.tel = cfg, env, dist, rundir, tel
        self.state, self.parts, self.per_rank = state, parts, {"rng": _RNG(env.device), **per_rank}

    def should_save(self, step: int, last: bool) -> bool:
        every = self.cfg.checkpoint.every_steps
        return last or bool(every and step % every == 0)

    def save(self, protect: Iterable[int] = ()) -> None:
        """Every training rank calls this; rank 0 writes. If rank 0 cannot write (disk full, read-only),
        every rank raises SaveError together, so none is left waiting in a collective."""
        if fsdp.is_sharded(self.parts["model"]):  # fsdp: checkpoints are directories
            info = {"train": self.state.state_dict(), "train_world": self.env.train_world,
                    "wandb_id": self.tel.wandb_id}
            path = save_sharded(self.rundir.checkpoints, self.state.step, checkpoint_dcp.state_of(self.parts),
                                {name: part.state_dict() for name, part in self.per_rank.items()}, info,
                                self.dist, self.env.train_rank, self.cfg.checkpoint.keep_last, protect)
            self.tel.event("checkpoint", step=self.state.step, path=path.name)
            return
        buf = io.BytesIO()  # tensors travel as torch.save bytes: pickling them through gloo fails
        torch.save({name: part.state_dict() for name, part in self.per_rank.items()}, buf)
        ranks = [torch.load(io.BytesIO(b), weights_only=True) for b in self.dist.all_gather_object(buf.getvalue())]
        error = None
        if self.env.is_main:
            data = {**{name: part.state_dict() for name, part in self.parts.items()}, **self.state.state_dict(),
                    "train_world": self.env.train_world, "ranks": ranks, "wandb_id": self.tel.wandb_id}
            try:
                path = save(self.rundir.checkpoints, self.state.step, data, self.cfg.checkpoint.keep_last, protect)
                self.tel.event("checkpoint", step=self.state.step, path=path.name)
            except SaveError as e:
                error = e
        if self.dist.all_reduce(torch.tensor([float(error is not None)]), "max").item():
            raise error or SaveError(f"training rank 0 could not save the step-{self.state.step} checkpoint")

    def restore(self) -> bool:
        """Rank 0 picks the newest checkpoint that loads; every rank loads that one. False: none."""
        if self.cfg.run.resume == "never":
            return False
        path, data, skipped = load_latest(self.rundir.checkpoints) if self.env.is_main else (None, None, [])
        for reason in skipped:
            self.tel.event("checkpoint_skipped", reason=reason)
        found = self.dist.broadcast_train(str(path) if path else None)
        if not found:
            if skipped:  # every checkpoint unreadable: say so, and forget the steps logged before
                log.warning("no checkpoint in %s could be loaded (%s); starting again from step 0",
                            self.rundir.checkpoints, "; ".join(skipped))
                self.tel.truncate_after(0)
                self.tel.event("restart_from_scratch", skipped=len(skipped))
            return False
        found = Path(found)
        data, own, saved_world = self._load_dir(found) if found.is_dir() else self._load_pt(found, data)
        self.state.load_state_dict(data)
        step = self.state.step
        if own is not None:
            for name, part in self.per_rank.items():
                part.load_state_dict(own[name])
        else:  # another number of ranks: continue, but per-rank randomness starts afresh
            seed_everything(self.cfg.run.seed + self.env.rank + 1000 * step)
            self.tel.event("resume_world_changed", saved=saved_world, now=self.env.train_world)
        self.tel.truncate_after(step, wandb_id=data.get("wandb_id"))
        self.tel.event("resume", step=step, epoch=self.state.epoch, checkpoint=found.name,
                       restart_count=self.env.restart_count)
        return True

    def _load_dir(self, found: Path) -> Tuple[dict, Optional[dict], int]:
        """A sharded checkpoint, into either strategy: each rank reads what its template needs (its rows of
        a DTensor, the whole of a plain tensor). (loop position, this rank's own parts, saved ranks)."""
        manifest = read_json(found / checkpoint_dcp.MANIFEST)
        template = checkpoint_dcp.state_of(self.parts)
        checkpoint_dcp.load_into(found, template, self.dist)
        checkpoint_dcp.apply(self.parts, template)
        saved_world = manifest["train_world"]
        own = checkpoint_dcp.own_parts(found, self.env.train_rank) if saved_world == self.env.train_world else None
        return {**manifest["train"], "wandb_id": manifest.get("wandb_id")}, own, saved_world

    def _load_pt(self, found: Path, data: Optional[dict]) -> Tuple[dict, Optional[dict], int]:
        """A .pt checkpoint (rank 0 read it already), into either strategy: under fsdp each rank keeps
        its rows of the full tensors."""
        if not self.env.is_main:
            data = load(found)
        if fsdp.is_sharded(self.parts["model"]):  # fsdp: checkpoints are directories
            checkpoint_dcp.apply(self.parts, data, full=True)
        else:
            for name, part in self.parts.items():
                part.load_state_dict(data[name])
        saved_world = len(data["ranks"])
        return data, data["ranks"][self.env.train_rank] if saved_world == self.env.train_world else None, saved_world
