"""The Checkpointer: what a training state holds, and saving and restoring it.

One table of parts, read by save and by restore alike, so the two cannot drift apart.
Where the files go and how they are found again: store.py (.pt) and dcp.py (sharded).
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch

from launcher.checkpoint import dcp, store
from launcher.config.schema import CheckpointConfig
from launcher.dist.rng import rng_state, set_rng_state
from launcher.errors import SaveError
from launcher.files import read_json

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where the loop is. (The micro-batch is not here: autobatch.json carries it across a resume.)
    `wall_time_s` counts every launch: the earlier ones' up to the checkpoint this one resumed from."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    earlier_s: float = 0.0  # wall time of the launches before this one (restored)
    started: float = field(default_factory=time.time)  # this launch's training (the loop resets it)

    @property
    def wall_time_s(self) -> float:
        return self.earlier_s + time.time() - self.started

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "wall_time_s": self.wall_time_s}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.earlier_s = float(state.get("wall_time_s", 0.0))  # older checkpoints lack it


def step_epoch(state: dict) -> int:
    """The epoch a checkpoint's step belongs to, as metrics.jsonl and the hand-off record it. The checkpoint holds
    where the *next* step starts: after an epoch's last step that is the next epoch, at batch 0."""
    done_an_epoch = state["batch_in_epoch"] == 0 and state["step"] > 0
    return state["epoch"] - 1 if done_an_epoch else state["epoch"]


class _RNG:
    """Every RNG of this process (of its own CUDA device only), as a part."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        return rng_state(self.device)

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state, self.device)


@dataclass(frozen=True)
class Resumed:
    """What `restore` found: the step, and whether every rank got its own per-rank parts (RNG, loss
    meter) back, which needs the same number of training ranks as the saving run."""
    step: int
    per_rank: bool


class Checkpointer:
    """Save and restore of the whole training state, and when to save.

    `parts` (model, optimizer, scheduler, scaler, EMA) are training rank 0's, saved once and loaded
    by every rank; `state` (the loop's position) is stored at the top level. `per_rank` parts (RNG,
    the loss meter) are gathered from every training rank, and each rank takes its own back.
    `sharded` (fsdp): every rank saves its own shards of every part into one .dcp directory; restore
    loads either kind into either strategy."""

    def __init__(self, cfg: CheckpointConfig, env, dist, rundir, tel, state: TrainState, parts: Dict[str, Any],
                 per_rank: Dict[str, Any], sharded: bool = False):
        self.cfg, self.env, self.dist, self.rundir, self.tel = cfg, env, dist, rundir, tel
        self.state, self.parts, self.per_rank = state, parts, {"rng": _RNG(env.device), **per_rank}
        self.sharded = sharded

    def step_end(self, step: int, force: bool, protect: Callable[[], Iterable[int]]) -> None:
        """After every optimizer step, on every training rank: save every `checkpoint.every_steps` steps,
        and whenever the loop says a checkpoint must exist (`force`: a validation step, a stop, the end).
        `protect()`: steps retention must keep (the best, the ones still being validated)."""
        every = self.cfg.every_steps
        if force or (every and step % every == 0):
            self.save(protect())

    def prune(self, protect: Iterable[int] = ()) -> None:
        """Retention again (rank 0), with what is known now: the last `keep_last`, and `protect`."""
        if self.env.is_main:
            store.prune(self.rundir.checkpoints, self.cfg.keep_last, protect)

    def save(self, protect: Iterable[int] = ()) -> None:
        """Every training rank calls this; rank 0 writes. If rank 0 cannot write (disk full, read-only),
        every rank raises SaveError together, so none is left waiting in a collective."""
        if self.sharded:  # fsdp: checkpoints are directories
            info = {"train": self.state.state_dict(), "train_world": self.env.train_world,
                    "wandb_id": self.tel.wandb_id}
            path = store.save_sharded(self.rundir.checkpoints, self.state.step, dcp.state_of(self.parts),
                                {name: part.state_dict() for name, part in self.per_rank.items()}, info,
                                self.dist, self.env.train_rank, self.cfg.keep_last, protect)
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
                path = store.save(self.rundir.checkpoints, self.state.step, data, self.cfg.keep_last, protect)
                self.tel.event("checkpoint", step=self.state.step, path=path.name)
            except SaveError as e:
                error = e
        if self.dist.any_rank(error is not None):
            raise error or SaveError(f"training rank 0 could not save the step-{self.state.step} checkpoint")

    def restore(self) -> Optional[Resumed]:
        """Rank 0 picks the newest checkpoint that loads; every rank loads that one. None: there is none."""
        path, data, skipped = store.load_latest(self.rundir.checkpoints) if self.env.is_main else (None, None, [])
        for reason in skipped:
            self.tel.event("checkpoint_skipped", reason=reason)
        found = self.dist.broadcast_train(str(path) if path else None)
        if not found:
            if skipped:  # every checkpoint unreadable: say so, and forget the steps logged before
                log.warning("no checkpoint in %s could be loaded (%s); starting again from step 0",
                            self.rundir.checkpoints, "; ".join(skipped))
                self.tel.truncate_after(0)
                self.tel.event("restart_from_scratch", skipped=len(skipped))
            return None
        found = Path(found)
        data, own, saved_world = self._load_dir(found) if found.is_dir() else self._load_pt(found, data)
        self.state.load_state_dict(data)
        step = self.state.step
        if own is not None:
            for name, part in self.per_rank.items():
                part.load_state_dict(own[name])
        else:  # another number of ranks: the caller reseeds per-rank randomness
            self.tel.event("resume_world_changed", saved=saved_world, now=self.env.train_world)
        self.tel.truncate_after(step, wandb_id=data.get("wandb_id"))
        self.tel.event("resume", step=step, epoch=self.state.epoch, checkpoint=found.name,
                       restart_count=self.env.restart_count)
        return Resumed(step, own is not None)

    def _load_dir(self, found: Path) -> Tuple[dict, Optional[dict], int]:
        """A sharded checkpoint, into either strategy: each rank reads what its template needs (its rows of
        a DTensor, the whole of a plain tensor). (loop position, this rank's own parts, saved ranks)."""
        manifest = read_json(found / dcp.MANIFEST)
        template = dcp.state_of(self.parts)
        dcp.load_into(found, template, self.dist)
        dcp.apply(self.parts, template)
        saved_world = manifest["train_world"]
        own = dcp.own_parts(found, self.env.train_rank) if saved_world == self.env.train_world else None
        return {**manifest["train"], "wandb_id": manifest.get("wandb_id")}, own, saved_world

    def _load_pt(self, found: Path, data: Optional[dict]) -> Tuple[dict, Optional[dict], int]:
        """A .pt checkpoint (rank 0 read it already), into either strategy: under fsdp each rank keeps
        its rows of the full tensors."""
        if not self.env.is_main:
            data = store.load(found)
        if self.sharded:  # each rank keeps its rows of the full tensors
            dcp.apply(self.parts, data, full=True)
        else:
            for name, part in self.parts.items():
                part.load_state_dict(data[name])
        saved_world = len(data["ranks"])
        return data, data["ranks"][self.env.train_rank] if saved_world == self.env.train_world else None, saved_world
