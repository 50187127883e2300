"""The Checkpointer: what a training state holds, and saving and restoring it.

One table of parts, read by save and by restore alike, so the two cannot drift apart.
Where the files go and how they are found again: store.py (.pt) and dcp.py (sharded).

Saving is asynchronous. The training thread only takes the snapshot (staging.py: a copy into host
buffers allocated once, on a GPU a side-stream copy that the next optimizer step waits for on the
device); a background thread (background.py) serializes, checksums, writes, commits and applies
retention. At most one save is in flight: a save that comes due while the previous one is still being
written waits for it (the wait counts as the checkpoint's stall). A checkpoint becomes visible only
once complete on every rank (store.py, dcp.py); retention, with the validator's protected steps, runs
after that commit. A failed background write is reported by `failed()`, which rides in the step's
agreement (signals.Guard), so every rank stops at the same step with SaveError (exit status 1) and
the earlier checkpoints intact. A final save (the end, an early stop, a stop signal) waits for its
own write, at most `checkpoint.drain_timeout_s`; `close()` waits as long for one still in flight
when training ends any other way (an exit 75 OOM restart, an error), so a stop or a restart resumes
from the newest step that could be written.
"""
from __future__ import annotations

import io
import logging
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from launcher.checkpoint import dcp, store
from launcher.checkpoint.background import Background
from launcher.checkpoint.staging import Snapshot, Stage, flatten
from launcher.config.schema import CheckpointConfig
from launcher.distributed import shards
from launcher.distributed.rng import rng_state, set_rng_state
from launcher.ema import EMA
from launcher.errors import SaveError
from launcher.files import read_json
from launcher.telemetry.stalls import Stalls

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


class _Scaler:
    """The GradScaler as a part, read without a host sync: its scale and growth tracker stay device
    tensors in the snapshot (GradScaler.state_dict() calls .item()); load_state_dict takes either."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict:
        s = self.scaler
        if not s.is_enabled() or s._scale is None:
            return s.state_dict()
        return {"scale": s._scale.reshape(()), "growth_factor": s._growth_factor, "backoff_factor": s._backoff_factor,
                "growth_interval": s._growth_interval, "_growth_tracker": s._growth_tracker.reshape(())}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict({k: v.item() if torch.is_tensor(v) else v for k, v in state.items()})


class _Live:
    """A part read for a snapshot with state_dict(live=True): the EMA's own tensors (the snapshot copies
    them), its counters without a host sync."""

    def __init__(self, part: Any):
        self.part = part

    def state_dict(self) -> dict:
        return self.part.state_dict(live=True)

    def load_state_dict(self, state: dict) -> None:
        self.part.load_state_dict(state)


def _as_part(part: Any) -> Any:
    if isinstance(part, torch.amp.GradScaler):
        return _Scaler(part)
    return _Live(part) if isinstance(part, EMA) else part


class Checkpointer:
    """Save and restore of the whole training state, and when to save.

    `parts` (model, optimizer, scheduler, scaler, EMA) are training rank 0's, saved once and loaded
    by every rank; `state` (the loop's position) is stored at the top level. `per_rank` parts (RNG,
    the loss meter) come from every training rank, and each rank takes its own back.
    `sharded` (fsdp): every rank saves its own shards of every part into one .dcp directory; restore
    loads either kind into either strategy. `stalls` (telemetry.stalls.Stalls) gets the training
    thread's time under `checkpoint`, and the writer's under background. `write_delay_s`
    (debug.checkpoint_write_delay_s): each background write waits this long, durable but not visible."""

    def __init__(self, cfg: CheckpointConfig, env, dist, rundir, tel, state: TrainState, parts: Dict[str, Any],
                 per_rank: Dict[str, Any], sharded: bool = False, stalls: Optional[Stalls] = None,
                 write_delay_s: float = 0.0):
        self.cfg, self.env, self.dist, self.rundir, self.tel = cfg, env, dist, rundir, tel
        self.state, self.per_rank = state, {"rng": _RNG(env.device), **per_rank}
        self.parts = {name: _as_part(part) for name, part in parts.items()}
        self.stalls = stalls if stalls is not None else Stalls()
        self.sharded, self.write_delay_s = sharded, write_delay_s
        self._live = dcp.Live(self.parts)  # fsdp: what state_of() returns, without get_state_dict's cost
        self.staging, self.worker = Stage(env.device), Background(env.device)
        self.snapshot: Optional[Snapshot] = None  # the last one taken
        self.pending: Optional[Future] = None  # the job in flight (a save, or preparing the buffers)
        self.error: Optional[str] = None  # this rank's failed save: sticky, every rank then stops
        self._buffers = {b.data_ptr() for b in self.parts["model"].buffers()}  # updated by every forward
        opt = self.parts["optimizer"]
        opt.register_step_pre_hook(lambda *_: self.staging.fence())  # a GPU: the copy finished before the state moves
        self._prepared = False
        opt.register_step_post_hook(self._prepare_buffers)

    def step_end(self, step: int, force: bool, protect: Callable[[], Iterable[int]], final: bool = False) -> None:
        """After every optimizer step, on every training rank: save every `checkpoint.every_steps` steps,
        and whenever the loop says a checkpoint must exist (`force`: a validation step; `final`: a stop,
        an early stop, the end, whose save is also waited for). `protect()`: steps retention must keep
        (the best, the ones still being validated)."""
        every = self.cfg.every_steps
        if force or final or (every and step % every == 0):
            self.save(protect(), final=final)

    def prune(self, protect: Iterable[int] = ()) -> None:
        """Retention again (rank 0), with what is known now: the last `keep_last`, and `protect`."""
        if self.env.is_main:
            store.prune(self.rundir.checkpoints, self.cfg.keep_last, protect)

    # ----------------------------------------------------------------------------- the training thread
    def _state(self) -> dict:
        """What this rank writes: the parts (ddp: rank 0 alone; fsdp: every rank, its shards) and its own."""
        if self.sharded:
            parts = self._live()
        elif self.env.is_main:
            parts = {name: part.state_dict() for name, part in self.parts.items()}
        else:
            parts = {}
        return {"parts": parts, "own": {name: part.state_dict() for name, part in self.per_rank.items()}}

    def _prepare_buffers(self, *_: Any) -> None:
        """After the first optimizer step (the optimizer's state exists now): the snapshot's buffers are
        allocated, pinned and touched by the background thread, not by the first save."""
        if self._prepared:
            return
        self._prepared = True
        _, tensors = flatten(self._state())
        self.pending = self.worker.submit(lambda: self.staging.prepare(tensors))

    def stage(self) -> Snapshot:
        """This step's snapshot: the one a save (or a hand-off) of this step took already, else taken now,
        after the save in flight has finished (at most one in flight)."""
        if self.snapshot is not None and self.snapshot.step == self.state.step:
            return self.snapshot
        with self.stalls.measure("checkpoint"):
            t0 = time.perf_counter()
            self.wait()
            self.snapshot = self.staging.take(self._state(), self.state.step,
                                            early=lambda t: not shards.is_sharded(t) and t.data_ptr() in self._buffers)
            self.snapshot.blocked_s = time.perf_counter() - t0
        return self.snapshot

    def shared(self, kinds: Iterable[str]) -> Optional[Tuple[Dict[str, dict], Snapshot]]:
        """For a hand-off at a step that also checkpoints (every validation step does): this step's
        snapshot of the weights it sends, {kind: state dict} of host tensors (`ema`: the average, `raw`:
        the model), taken once for both. None where this rank's checkpoint holds no such weights."""
        snap = self.stage()
        parts = snap.state["parts"]
        found = {"ema": (parts.get("ema") or {}).get("shadow"), "raw": parts.get("model")}
        if any(found.get(kind) is None for kind in kinds):
            return None
        return {kind: found[kind] for kind in kinds}, snap

    def save(self, protect: Iterable[int] = (), final: bool = False) -> None:
        """Every training rank calls this. Takes (or reuses) this step's snapshot and hands it to the
        background writer. `final` (the end, an early stop, a stop signal): also wait for the write, at most
        checkpoint.drain_timeout_s, and agree on the outcome: SaveError on every rank if any failed."""
        with self.stalls.measure("checkpoint"):
            snap = self.stage()
            t0 = time.perf_counter()
            info = {"train": self.state.state_dict(), "train_world": self.env.train_world,
                    "wandb_id": self.tel.wandb_id}
            release = snap.lease()
            snap.blocked_s += time.perf_counter() - t0  # the event's blocked_ms: all but a final save's own wait
            self.pending = self.worker.submit(lambda: self._write(snap, info, list(protect), release))
            if final:
                self._finish(snap.step)

    def failed(self) -> Optional[str]:
        """Why this rank's last background save failed, or None (the Guard's flag for the step's agreement)."""
        return self.error

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the save in flight (at most `timeout` seconds); True when none is left."""
        if self.pending is None:
            return True
        try:
            self.pending.result(timeout)
        except FutureTimeout:
            return False
        self.pending = None
        return True

    def _finish(self, step: int) -> None:
        timeout = self.cfg.drain_timeout_s
        if not self.wait(timeout) and self.error is None:
            self.error = f"the checkpoint of step {step} was not written within checkpoint.drain_timeout_s={timeout:g}"
        if self.dist.any_rank(self.error is not None):
            raise SaveError(self.error or f"another training rank could not write its part of the step-{step} "
                            "checkpoint (see its log); the previous checkpoints are intact")

    def close(self) -> None:
        """At the end of training, however it ends: wait (bounded) for the save in flight, then free the buffers."""
        if self.wait(self.cfg.drain_timeout_s):
            self.worker.close()
            self.staging.close()

    # --------------------------------------------------------------------------- the background thread
    def _write(self, snap: Snapshot, info: dict, protect: List[int], release: Callable[[], None]) -> None:
        """Write one snapshot; record the outcome (never raises: the training thread reads `error`)."""
        t0 = time.perf_counter()
        try:
            snap.synchronize()
            path = self._write_dcp(snap, info, protect) if self.sharded else self._write_pt(snap, info, protect)
        except Exception as e:  # noqa: BLE001 - a failed write must not kill the thread; training stops cleanly
            self.error = str(e) if isinstance(e, SaveError) else \
                f"could not save checkpoint step {snap.step}: {type(e).__name__}: {e}"
            log.error("background checkpoint of step %d failed: %s", snap.step, self.error)
            self.tel.event("checkpoint_failed", step=snap.step, error=self.error)
            return
        finally:
            release()
        write_s = time.perf_counter() - t0
        self.stalls.background("checkpoint", write_s)
        if path is not None:  # training rank 0 committed it: the event (a file append, safe from this thread)
            self.tel.event("checkpoint", step=snap.step, path=path.name, blocked_ms=round(snap.blocked_s * 1e3, 3),
                           write_s=round(write_s, 3))

    def _write_pt(self, snap: Snapshot, info: dict, protect: List[int]) -> Optional[Path]:
        """ddp: every rank's own parts reach training rank 0 (a gather over the background group), which
        writes the .pt file."""
        buf = io.BytesIO()  # tensors travel as torch.save bytes: pickling them through gloo fails
        torch.save(snap.state["own"], buf)
        ranks = [torch.load(io.BytesIO(b), weights_only=True)
                 for b in self.dist.background.all_gather_object(buf.getvalue())]
        if not self.env.is_main:
            return None
        data = {**snap.state["parts"], **info["train"], "train_world": info["train_world"], "ranks": ranks,
                "wandb_id": info["wandb_id"]}
        return store.save(self.rundir.checkpoints, snap.step, data, self.cfg.keep_last, protect,
                          before_commit=lambda: self._pause(snap.step))

    def _pause(self, step: int) -> None:
        """debug.checkpoint_write_delay_s: the data is durable but not visible yet (a slow disk), so a test can
        stop or kill the run in the middle of a background write."""
        if self.write_delay_s:
            log.info("checkpoint of step %d written, not visible yet: waiting debug.checkpoint_write_delay_s=%g",
                     step, self.write_delay_s)
            time.sleep(self.write_delay_s)

    def _write_dcp(self, snap: Snapshot, info: dict, protect: List[int]) -> Optional[Path]:
        """fsdp: every rank writes its shards (DCP over the background group); rank 0 commits."""
        path = store.save_sharded(self.rundir.checkpoints, snap.step, snap.state["parts"], snap.state["own"], info,
                                  self.dist.background, self.env.train_rank, self.cfg.keep_last, protect,
                                  before_commit=lambda: self._pause(snap.step))
        return path if self.env.is_main else None

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
