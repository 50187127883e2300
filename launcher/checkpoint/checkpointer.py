"""The Checkpointer: what a training state holds, and saving and restoring it.

One table of parts, read by save and by restore alike, so the two cannot drift apart.
Where the files go and how they are found again: store.py (.pt) and dcp.py (sharded).

Saving is asynchronous, and the loop passes the values: `snapshot()` takes this step's snapshot
once (staging.py: a copy into host buffers allocated once; on a GPU a side-stream copy that the
training step waits for on the device before its next optimizer step, `fence()`), the loop hands
its weights to the hand-off and the snapshot itself to `save(snapshot, protect, final)`, and a
background thread (background.py) serializes, checksums, writes and commits it, then applies
retention (`retain`: the last `checkpoint.keep_last` and the protected steps, the one place that
prunes). At most one save is in flight: a snapshot taken while the previous save is still being
written waits for it (the wait counts as the checkpoint's stall). A checkpoint becomes visible only
once complete on every rank (store.py, dcp.py). A failed background write is reported by
`failed()`, a flag of the step's agreement, so every rank stops at the same step with SaveError
(exit status 1; `stop_if_failed`) and the earlier checkpoints intact. A final save (the end, an
early stop, a stop signal) waits for its own write, at most `checkpoint.drain_timeout_s`; `close()`
waits as long for one still in flight when training ends any other way (an exit 75 OOM restart, an
error), so a stop or a restart resumes from the newest step that could be written. `restore()`
loads the newest checkpoint that loads and says what it found; the Trainer tells telemetry.
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
from launcher.checkpoint.staging import Snapshot, Stage, flatten, snapshot_state
from launcher.config.schema import CheckpointConfig
from launcher.distributed import shards
from launcher.distributed.rng import rng_state, set_rng_state
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
    """The checkpoint `restore` loaded: its step and name, the number of training ranks that saved it,
    whether every rank got its own per-rank parts (RNG, loss meter) back (the same number of ranks),
    and the wandb run id it recorded."""
    step: int
    checkpoint: str
    saved_world: int
    per_rank: bool
    wandb_id: Optional[str] = None


@dataclass(frozen=True)
class Restored:
    """What `restore` found: the checkpoint it loaded (None: none loads), and why each newer one was
    skipped (training rank 0's reasons, newest first; empty elsewhere)."""
    resumed: Optional[Resumed]
    skipped: List[str]


class Checkpointer:
    """Save and restore of the whole training state, and when to save.

    `parts` (model, optimizer, scheduler, scaler, EMA) are training rank 0's, saved once and loaded
    by every rank; `state` (the loop's position) is stored at the top level. `per_rank` parts (RNG,
    the loss meter) come from every training rank, and each rank takes its own back. A part is read
    through staging.snapshot_state (its own `snapshot_state()` where it offers one).
    `sharded` (fsdp): every rank saves its own shards of every part into one .dcp directory; restore
    loads either kind into either strategy. `staging`: the Stage the snapshots go to (the Trainer's,
    whose `fence()` its training step calls). `stalls` (telemetry.stalls.Stalls) gets the training
    thread's time under `checkpoint`, and the writer's under background. `write_delay_s`
    (debug.checkpoint_write_delay_s): each background write waits this long, durable but not visible."""

    def __init__(self, cfg: CheckpointConfig, env, dist, rundir, tel, state: TrainState, parts: Dict[str, Any],
                 per_rank: Dict[str, Any], sharded: bool = False, stalls: Optional[Stalls] = None,
                 write_delay_s: float = 0.0, staging: Optional[Stage] = None):
        self.cfg, self.env, self.dist, self.rundir, self.tel = cfg, env, dist, rundir, tel
        self.state, self.per_rank = state, {"rng": _RNG(env.device), **per_rank}
        self.parts = parts
        self.stalls = stalls if stalls is not None else Stalls()
        self.sharded, self.write_delay_s = sharded, write_delay_s
        self._live = dcp.Live(self.parts)  # fsdp: what state_of() returns, without get_state_dict's cost
        self.staging = staging if staging is not None else Stage(env.device)
        self.worker = Background(env.device)
        self.last: Optional[Snapshot] = None  # the last snapshot taken
        self.pending: Optional[Future] = None  # the job in flight (a save, or preparing the buffers)
        self.error: Optional[str] = None  # this rank's failed save: sticky, every rank then stops
        self._buffers = {b.data_ptr() for b in self.parts["model"].buffers()}  # updated by every forward
        self._prepared: Optional[int] = None  # the optimizer state's size the buffers were prepared for

    def due(self, step: int) -> bool:
        """Whether `step` saves on its own account (`checkpoint.every_steps`); the loop also saves at every
        validation step (the best step must have a full checkpoint) and at a final one."""
        every = self.cfg.every_steps
        return bool(every) and step % every == 0

    def fence(self) -> None:
        """Before the optimizer step (the training step calls it): the training stream waits, on the device,
        for the last snapshot's copy out of the state (free once it finished; no host sync)."""
        self.staging.fence()

    def retain(self, protect: Iterable[int] = ()) -> None:
        """Retention, the one place that prunes (training rank 0): the last `keep_last` complete checkpoints
        and `protect` (the best, the steps still being validated). After every commit (the writer thread,
        with the steps protected when that save was asked for) and once more at the end, with what is
        known then."""
        if self.env.is_main:
            store.prune(self.rundir.checkpoints, self.cfg.keep_last, protect)

    # ----------------------------------------------------------------------------- the training thread
    def _state(self) -> dict:
        """What this rank writes: the parts (ddp: rank 0 alone; fsdp: every rank, its shards) and its own."""
        if self.sharded:
            parts = self._live()
        elif self.env.is_main:
            parts = {name: snapshot_state(part) for name, part in self.parts.items()}
        else:
            parts = {}
        return {"parts": parts, "own": {name: part.state_dict() for name, part in self.per_rank.items()}}

    def prepare(self) -> None:
        """After each optimizer step (the loop calls it; it costs a len() but where the optimizer's state
        grew): the snapshot's buffers are allocated, pinned and touched by the background thread for the
        state as it is now, not by the next snapshot. So once after the first step, and again after the
        first one the GradScaler did not skip (a skipped step creates no optimizer state)."""
        size = len(self.parts["optimizer"].state)
        if self._prepared == size:
            return
        self._prepared = size
        _, tensors = flatten(self._state())
        self.pending = self.worker.submit(lambda: self.staging.prepare(tensors))

    def snapshot(self) -> Snapshot:
        """This step's snapshot: the one taken already at this step, else taken now, after the save in
        flight has finished (at most one in flight). Its `weights` are what a hand-off sends."""
        if self.last is not None and self.last.step == self.state.step:
            return self.last
        with self.stalls.measure("checkpoint"):
            t0 = time.perf_counter()
            self.wait()
            self.last = self.staging.take(self._state(), self.state.step,
                                          early=lambda t: not shards.is_sharded(t) and t.data_ptr() in self._buffers)
            self.last.weights = store.weights(self.last.state["parts"])
            self.last.blocked_s = time.perf_counter() - t0
        return self.last

    def save(self, snap: Snapshot, protect: Iterable[int] = (), final: bool = False) -> None:
        """Every training rank calls this with this step's snapshot: the background writer writes and
        commits it, then applies retention keeping `protect` (the steps the validation still needs). `final`
        (the end, an early stop, a stop signal): also wait for the write, at most checkpoint.drain_timeout_s,
        and agree on the outcome: SaveError on every rank if any failed."""
        with self.stalls.measure("checkpoint"):
            t0 = time.perf_counter()
            self.wait()  # the snapshot's own wait already waited for the previous save: free
            info = {"train": self.state.state_dict(), "train_world": self.env.train_world,
                    "wandb_id": self.tel.wandb_id}
            release = snap.lease()
            snap.blocked_s += time.perf_counter() - t0  # the event's blocked_ms: all but a final save's own wait
            protect = list(protect)
            self.pending = self.worker.submit(lambda: self._write(snap, info, protect, release))
            if final:
                self._finish(snap.step)

    def stop_if_failed(self, anywhere: bool) -> None:
        """`anywhere`: the step's agreement says a background save failed on some training rank. Then every
        rank raises SaveError at this same step (this rank's reason where it is the one that failed)."""
        if anywhere:
            raise SaveError(self.error or "another training rank could not write its checkpoint (see its log); "
                            "the previous checkpoints are intact")

    def failed(self) -> Optional[str]:
        """Why this rank's last background save failed, or None (a flag of the step's agreement)."""
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
        """At the end of training, however it ends: wait (bounded) for the save in flight and for every reader
        of the buffers (a hand-off's copy-out), then free them."""
        if self.wait(self.cfg.drain_timeout_s) and self.staging.wait_free(self.cfg.drain_timeout_s):
            self.worker.close()
            self.staging.close()

    # --------------------------------------------------------------------------- the background thread
    def _write(self, snap: Snapshot, info: dict, protect: List[int], release: Callable[[], None]) -> None:
        """Write one snapshot; record the outcome (never raises: the training thread reads `error`)."""
        t0 = time.perf_counter()
        try:
            snap.synchronize()
            path = self._write_dcp(snap, info) if self.sharded else self._write_pt(snap, info)
            self.retain(protect)  # committed: retention may now drop the older ones
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

    def _write_pt(self, snap: Snapshot, info: dict) -> Optional[Path]:
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
        return store.save(self.rundir.checkpoints, snap.step, data, before_commit=lambda: self._pause(snap.step))

    def _pause(self, step: int) -> None:
        """debug.checkpoint_write_delay_s: the data is durable but not visible yet (a slow disk), so a test can
        stop or kill the run in the middle of a background write."""
        if self.write_delay_s:
            log.info("checkpoint of step %d written, not visible yet: waiting debug.checkpoint_write_delay_s=%g",
                     step, self.write_delay_s)
            time.sleep(self.write_delay_s)

    def _write_dcp(self, snap: Snapshot, info: dict) -> Optional[Path]:
        """fsdp: every rank writes its shards (DCP over the background group); rank 0 commits."""
        path = store.save_sharded(self.rundir.checkpoints, snap.step, snap.state["parts"], snap.state["own"], info,
                                  self.dist.background, self.env.train_rank,
                                  before_commit=lambda: self._pause(snap.step))
        return path if self.env.is_main else None

    def restore(self) -> Restored:
        """Rank 0 picks the newest checkpoint that loads; every rank loads that one. Says what it found (the
        Trainer tells telemetry): `resumed` None when none loads."""
        path, data, skipped = store.load_latest(self.rundir.checkpoints) if self.env.is_main else (None, None, [])
        found = self.dist.broadcast_train(str(path) if path else None)
        if not found:
            return Restored(None, skipped)
        found = Path(found)
        data, own, saved_world = self._load_dir(found) if found.is_dir() else self._load_pt(found, data)
        self.state.load_state_dict(data)
        if own is not None:
            for name, part in self.per_rank.items():
                part.load_state_dict(own[name])
        return Restored(Resumed(self.state.step, found.name, saved_world, own is not None, data.get("wandb_id")),
                        skipped)

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
