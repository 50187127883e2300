"""The hand-off queue between trainer and validator: plain files in <run>/handoff/.

Trainer side, `Writer` (training rank 0; under train.strategy=fsdp every training rank, of its own
shards: see handoff_shards). `put()` gets the checkpoint's snapshot of the step (every validation
step checkpoints; checkpoint/staging.py) and the weights to send, host tensors inside it: one copy
of the device state for both. It leases the snapshot's buffers and queues it. The writer's copy
thread waits for the snapshot's device copy, copies the weights out into host memory of its own
and releases the lease at once: the next snapshot (a checkpoint, the next hand-off) waits at most
for that memcpy, never for a hand-off file still being written. Its write thread then writes
`<step>.safetensors` from that copy (no bytes copies, the GIL released while it writes and hashes),
then `<step>.json` (the manifest: step, epoch, weights, sha256, bytes). A manifest exists only once
its data is complete. Under policy=latest a hand-off that comes while two are still outstanding
(one file being written, one waiting) is skipped (val/skipped.jsonl reason `busy`), so a slow disk
costs validations, not memory; policy=all queues every one. An out-of-memory error in the
copy-out (debug.handoff_oom_at_step injects one) skips that snapshot (reason `oom`) and training
goes on.

Validator side, `claim()`: every change of a snapshot's state is an atomic rename
of its manifest (`.json` -> `.claimed` / `.dropped` / `.bad`), so a trainer
dropping a stale snapshot and a validator claiming it can never both win, and
nothing the validator still needs is ever deleted.

Control files (stop.json, done.json, validator.json): control.py.
Skipped snapshots go to val/skipped.jsonl.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from safetensors.torch import load as st_load

from launcher.validation import handoff_shards
from launcher.files import Corrupt, atomic_write, read_json, verify, write_json, write_safetensors
from launcher.batch.recovery import is_oom
from launcher.checkpoint import staging
from launcher.rundir import SNAPSHOT_MANIFEST, Manifest, RunDir, snapshot_name

log = logging.getLogger(__name__)


def data_path(directory: Path, step: int) -> Path:
    return Path(directory) / snapshot_name(step, "safetensors")


def manifest_path(directory: Path, step: int, state: str = "json") -> Path:
    return Path(directory) / snapshot_name(step, state)


def pending(directory: Path) -> List[int]:
    """Unclaimed, complete snapshots, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := SNAPSHOT_MANIFEST.match(n)))


def _transition(directory: Path, step: int, src: str, dst: str) -> bool:
    """Atomically move a snapshot's manifest from one state to another; False if someone else won."""
    try:
        os.rename(manifest_path(directory, step, src), manifest_path(directory, step, dst))
        return True
    except FileNotFoundError:
        return False


def settled(directory: Path, step: int) -> bool:
    """Nothing left to do for this snapshot: validated, dropped or rejected (a sharded one whose
    pieces are still arriving is not settled either)."""
    return not any(manifest_path(directory, step, s).exists() for s in ("json", "claimed")) \
        and not handoff_shards.pieces_of(directory, step)


def data_files(directory: Path, step: int) -> List[Path]:
    """A snapshot's data: one file (ddp) or one piece per training rank (fsdp)."""
    return [data_path(directory, step), *handoff_shards.pieces_of(directory, step)]


def drop(directory: Path, step: int, reason: str = "stale") -> bool:
    """Remove an unclaimed snapshot (policy=latest); False if a validator claimed it first."""
    if not _transition(directory, step, "json", "dropped"):
        return False
    for path in data_files(directory, step):
        path.unlink(missing_ok=True)
    manifest_path(directory, step, "dropped").unlink(missing_ok=True)
    RunDir(Path(directory).parent).skip(step, reason)
    return True


# ---------------------------------------------------------------- trainer side

@dataclass
class _Job:
    """One hand-off on its way to disk: its weights in the snapshot's buffers until copied out."""
    step: int
    epoch: int
    kinds: List[str]
    host: Dict[str, torch.Tensor]  # {kind/name: tensor}: the snapshot's until copied, then the writer's own
    layouts: dict  # fsdp: where each sharded tensor's piece sits
    snapshot: Optional[staging.Snapshot]
    release: Callable[[], None]
    blocked_s: float = 0.0


class Writer:
    """This rank's end of the queue (see the module docstring): `put(step, epoch, snapshot, weights)` on the
    training thread, a copy thread and a write thread behind it. Sharded (fsdp: `world` = the training
    world size): every training rank's end, writing its own shards as one piece of the snapshot; the rank
    that completes a snapshot drops the stale ones.
    `on_written(step, blocked_s, write_s)`: called by the write thread once a snapshot is on disk."""

    def __init__(self, run_dir, policy: str, keep: int, fault=None, rank: int = 0, world: Optional[int] = None,
                 on_written: Optional[Callable[[int, float, float], None]] = None):
        self.rundir = RunDir.of(run_dir)
        self.dir = self.rundir.handoff
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.layouts = rank, world, {}
        if world is not None and rank == 0:
            handoff_shards.sweep(self.dir)  # a previous session's incomplete pieces: this session writes them anew
        self.policy, self.keep = policy, keep
        self.fault = fault  # debug.handoff_oom_at_step (faults.py)
        self.on_written = on_written
        self.outstanding = 0  # put, not yet written (or skipped)
        self._lock = threading.Lock()
        self.spare: List[Dict[str, torch.Tensor]] = []  # written copies' host memory, reused
        self.copies: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self.writes: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self.submitted: List[int] = []
        self.blocked_s: List[float] = []
        self.threads = [threading.Thread(target=self._copy_loop, name="handoff-copy", daemon=True),
                        threading.Thread(target=self._write_loop, name="handoff-writer", daemon=True)]
        for thread in self.threads:
            thread.start()

    def _flat(self, states: Dict[str, Dict[str, torch.Tensor]]) -> tuple[Dict[str, torch.Tensor], dict]:
        """The tensors this rank writes ({kind/name: tensor}) and, sharded, their Layouts."""
        if self.world is not None:  # (a DTensor's detach() costs ~30 us: the local tensors are detached)
            return handoff_shards.local_state({f"{kind}/{k}": v for kind, sd in states.items() for k, v in sd.items()},
                                       self.rank, self.layouts)
        return {f"{kind}/{k}": v.detach() for kind, sd in states.items() for k, v in sd.items()}, {}

    def put(self, step: int, epoch: int, snapshot: staging.Snapshot,
            weights: Dict[str, Dict[str, torch.Tensor]]) -> Optional[float]:
        """Hand off `weights` ({kind: state dict} of host tensors inside `snapshot`, the checkpoint's snapshot
        of this step); returns the seconds the caller was blocked, None when skipped (busy)."""
        t0 = time.perf_counter()
        with self._lock:
            busy = self.policy == "latest" and self.outstanding >= 2  # policy=all: every snapshot must reach it
            if not busy:
                self.outstanding += 1
        if busy:
            self.rundir.skip(step, "busy", "the previous snapshots' files were still being written"
                             + (f" (rank {self.rank})" if self.world else ""))
            log.warning("hand-off of step %d skipped: the previous snapshots' files are still being written", step)
            return None
        host, layouts = self._flat(weights)
        job = _Job(step, epoch, sorted(weights), host, layouts, snapshot, snapshot.lease())
        job.blocked_s = time.perf_counter() - t0
        self.copies.put(job)
        self.submitted.append(step)
        self.blocked_s.append(job.blocked_s)
        return job.blocked_s

    def _copy_loop(self) -> None:
        """Each job's weights out of the snapshot's buffers, into host memory of the writer's own (spare
        copies reused), then the buffers released: never behind a file being written."""
        while (job := self.copies.get()) is not None:
            try:
                job.snapshot.synchronize()
                if self.fault is not None:
                    self.fault(job.step)
                job.host = self._copy_out(job.host)
            except Exception as e:  # noqa: BLE001 - an OOM skips this snapshot; anything else is logged too
                job.release()
                self._skipped(job, e)
                continue
            job.release()
            job.snapshot = None
            self.writes.put(job)
        self.writes.put(None)

    @torch.no_grad()
    def _copy_out(self, src: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        with self._lock:
            same = [i for i, d in enumerate(self.spare) if d.keys() == src.keys() and all(
                d[k].shape == v.shape and d[k].dtype == v.dtype for k, v in src.items())]
            dst = self.spare.pop(same[0]) if same else None
        if dst is None:
            dst = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in src.items()}
        if src:
            torch._foreach_copy_(list(dst.values()), list(src.values()))
        return dst

    def _skipped(self, job: _Job, e: Exception) -> None:
        with self._lock:
            self.outstanding -= 1
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if is_oom(e):
            self.rundir.skip(job.step, "oom", detail)
            log.warning("hand-off of step %d skipped, out of memory: %s", job.step, detail)
        else:
            log.error("hand-off of step %d failed: %s: %s", job.step, type(e).__name__, detail)
            self.rundir.skip(job.step, "write_failed", detail)

    def _write_loop(self) -> None:
        while (job := self.writes.get()) is not None:
            t0 = time.perf_counter()
            try:
                published = self._write(job) if self.world is None else self._write_piece(job)
                if self.policy == "latest" and published:  # drop() is a rename: of two droppers one wins
                    for old in pending(self.dir)[:-self.keep]:
                        drop(self.dir, old, "stale")
                if self.on_written is not None:
                    self.on_written(job.step, job.blocked_s, time.perf_counter() - t0)
            except Exception:  # a full disk must not kill training; the step shows up as unvalidated
                log.exception("hand-off of step %d failed", job.step)
                self.rundir.skip(job.step, "write_failed")
            finally:
                with self._lock:
                    self.spare = [job.host, *self.spare][:2]
                    self.outstanding -= 1

    def _write(self, job: _Job) -> bool:
        step, epoch, kinds = job.step, job.epoch, job.kinds
        meta, out = {"step": str(step), "epoch": str(epoch), "weights": ",".join(kinds)}, []
        atomic_write(data_path(self.dir, step), lambda f: out.append(write_safetensors(f, job.host, meta)))
        (sha256, size), = out
        write_json(manifest_path(self.dir, step), vars(Manifest(
            step, epoch, kinds, data_path(self.dir, step).name, sha256, size, time.time())))
        return True

    def _write_piece(self, job: _Job) -> bool:
        """This rank's piece; the last rank to finish publishes the manifest (no collective) and, like
        the single writer, drops what is stale. True when this rank published the snapshot."""
        return handoff_shards.write_and_publish(self.dir, job.step, job.epoch, job.kinds, job.host, job.layouts,
                                                self.rank, self.world)

    def idle(self) -> bool:
        """Nothing queued, being copied or being written."""
        with self._lock:
            return self.outstanding == 0

    def flush(self) -> None:
        """Wait until every snapshot is on disk (used once, after training)."""
        self.copies.put(None)
        for thread in self.threads:
            thread.join()


# ---------------------------------------------------------------- validator side

@dataclass
class Claimed:
    """A snapshot the validator claimed (its manifest renamed `.claimed`): load, then ack or reject it."""
    directory: Path
    step: int

    def load(self) -> tuple[Manifest, Dict[str, Dict[str, torch.Tensor]]]:
        """(manifest, {kind: state_dict}), verified; raises files.Corrupt."""
        try:
            raw = read_json(manifest_path(self.directory, self.step, "claimed"))
            manifest = Manifest(**{f.name: raw[f.name] for f in fields(Manifest)})
            if "pieces" in raw:  # sharded (fsdp): one piece per training rank
                return manifest, _unflatten(handoff_shards.load(self.directory, raw))
            data = data_path(self.directory, self.step).read_bytes()
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise Corrupt(str(e) if isinstance(e, ValueError) else f"unreadable: {type(e).__name__}: {e}") from None
        verify(data, manifest.sha256, manifest.bytes, data_path(self.directory, self.step).name)
        try:
            flat = st_load(data)
        except Exception as e:
            raise Corrupt(f"not a safetensors file: {e}") from None
        return manifest, _unflatten(flat)

    def ack(self) -> None:
        """Validated: the files are no longer needed."""
        for path in data_files(self.directory, self.step):
            path.unlink(missing_ok=True)
        manifest_path(self.directory, self.step, "claimed").unlink(missing_ok=True)

    def reject(self, reason: str) -> None:
        """Corrupt: move aside as .bad (kept for inspection), record it, go on."""
        for data in data_files(self.directory, self.step):
            if data.exists():
                os.replace(data, data.with_name(data.name + ".bad"))
        _transition(self.directory, self.step, "claimed", "bad")
        RunDir(Path(self.directory).parent).skip(self.step, "corrupt", reason)


def _unflatten(flat: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
    states: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        kind, _, name = key.partition("/")
        states.setdefault(kind, {})[name] = t
    return states


def claim(directory: Path, policy: str) -> Optional[Claimed]:
    """The next snapshot to validate: the oldest (policy=all) or the newest, dropping older ones (latest)."""
    steps = pending(directory)
    for step in (reversed(steps) if policy == "latest" else steps):
        if _transition(directory, step, "json", "claimed"):
            if policy == "latest":
                for old in steps:
                    if old < step:
                        drop(directory, old, "stale")
            handoff_shards.sweep(directory, below=step)  # older sharded steps still incomplete never will be
            return Claimed(Path(directory), step)
    return None


def recover(directory: Path) -> None:
    """A validator that died holding a claim: give its snapshot back to the queue."""
    for p in Path(directory).glob("*.claimed"):
        os.replace(p, p.with_suffix(".json"))
