"""The hand-off queue between trainer and validator: plain files in <run>/handoff/.

Trainer side, `Writer` (training rank 0): `put()` normally gets the checkpoint's snapshot of the
step (every validation step checkpoints; checkpoint/staging.py) and writes from its pinned host
buffers, no second copy, leasing them until written. Otherwise it copies into one of two slots of
its own (`prepare()` allocates them ahead) on a side stream (no device staging copy) without
synchronizing the training stream; `fence()` makes the training stream wait for that copy before
the EMA moves on (a GPU-side wait).
An out-of-memory error inside `put()` skips that snapshot (val/skipped.jsonl, reason
`oom`) and training goes on; a background
thread writes `<step>.safetensors` straight from the pinned buffers (no bytes copies,
the GIL released while it writes and hashes), then `<step>.json` (the manifest: step, epoch,
weights, sha256, bytes). A manifest exists only once its data is complete. Under
train.strategy=fsdp every training rank has a Writer of its own shards: see handoff_shards.

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
from dataclasses import dataclass, field, fields
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
ALIGN = 64  # bytes: where each tensor's view starts in a slot's buffer


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
class _Slot:
    """One set of pinned host buffers; the writer thread owns it until it is written."""
    host: Dict[str, torch.Tensor] = field(default_factory=dict)
    ready: Optional[object] = None  # CUDA event (or a Snapshot): the device-to-host copy finished
    layouts: dict = field(default_factory=dict)  # fsdp: where each sharded tensor's piece sits
    release: Optional[Callable[[], None]] = None  # a checkpoint's snapshot: give its buffers back once written


class Writer:
    """Rank 0's end of the queue. Two slots, so a new snapshot never overwrites one still being written.
    Sharded (fsdp: `world` = the training world size): every training rank's end, writing its own
    shards as one piece of the snapshot; the rank that completes a snapshot drops the stale ones."""

    def __init__(self, run_dir, policy: str, keep: int, device: torch.device, fault=None, rank: int = 0,
                 world: Optional[int] = None, on_written: Optional[Callable[[int, float, float], None]] = None):
        """`on_written(step, blocked_s, write_s)`: called by the writer thread once a snapshot is on disk."""
        self.rundir = RunDir.of(run_dir)
        self.dir = self.rundir.handoff
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.layouts = rank, world, {}
        if world is not None and rank == 0:
            handoff_shards.sweep(self.dir)  # a previous session's incomplete pieces: this session writes them anew
        self.policy, self.keep = policy, keep
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.pending = None  # CUDA event: the last copy out of the live weights finished (see fence())
        self.fault = fault  # debug.handoff_oom_at_step (faults.py)
        self.on_written = on_written
        self.free: "queue.Queue[_Slot]" = queue.Queue()
        self.slots = [_Slot(), _Slot()]
        for slot in self.slots:
            self.free.put(slot)
        self.jobs: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self.submitted: List[int] = []
        self.blocked_s: List[float] = []
        self.thread = threading.Thread(target=self._write_loop, name="handoff-writer", daemon=True)
        self.thread.start()

    def _flat(self, states: Dict[str, Dict[str, torch.Tensor]]) -> tuple[Dict[str, torch.Tensor], dict]:
        """The tensors this rank copies ({kind/name: tensor}) and, sharded, their Layouts."""
        if self.world is not None:  # (a DTensor's detach() costs ~30 us: the local tensors are detached)
            return handoff_shards.local_state({f"{kind}/{k}": v for kind, sd in states.items() for k, v in sd.items()},
                                       self.rank, self.layouts)
        return {f"{kind}/{k}": v.detach() for kind, sd in states.items() for k, v in sd.items()}, {}

    def _allocate(self, slot: _Slot, flat: Dict[str, torch.Tensor]) -> None:
        """`slot.host`: a view per tensor into ONE (pinned) byte buffer, each view 64-byte aligned. One pinned
        allocation per slot, not one per tensor: cudaHostAlloc is slow, and the pinned caching allocator
        rounds every allocation up to a power of two (up to 2x per tensor; here once, for the slot)."""
        sizes = [-(-v.numel() * v.element_size() // ALIGN) * ALIGN for v in flat.values()]
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=self.cuda)
        slot.host, offset = {}, 0
        for (k, v), size in zip(flat.items(), sizes):
            n = v.numel() * v.element_size()
            slot.host[k] = buffer[offset:offset + n].view(v.dtype).view(v.shape)
            offset += size

    def prepare(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """At setup: allocate both slots' (pinned) host buffers for `states`, so no put() allocates
        pinned memory on the training thread (cudaHostAlloc is slow and synchronizes the device)."""
        flat, _ = self._flat(states)
        for slot in self.slots:
            self._allocate(slot, flat)
            for t in slot.host.values():
                t.zero_()  # touch the pages now: first-touch page faults cost ~1 ms per 3 MB in put()

    @torch.no_grad()
    def put(self, step: int, epoch: int, states: Dict[str, Dict[str, torch.Tensor]],
            shared: Optional[staging.Snapshot] = None) -> Optional[float]:
        """Snapshot `states` ({kind: state_dict}); returns the seconds the caller was blocked, None if dropped.
        `shared`: the checkpoint's snapshot of this step, whose host tensors `states` are (written as is)."""
        t0 = time.perf_counter()
        slot = _Slot(ready=shared, release=shared.lease()) if shared is not None else self._free_slot(step)
        if slot is None:
            return None
        try:
            if self.fault is not None:
                self.fault(step)
            if shared is None:
                self._copy(states, slot)
            else:
                slot.host, slot.layouts = self._flat(states)
        except Exception as e:  # noqa: BLE001 - an OOM skips this snapshot; anything else is a bug
            self._give_back(slot, emptied=is_oom(e))
            if not is_oom(e):
                raise
            detail = str(e).splitlines()[0][:200]
            self.rundir.skip(step, "oom", detail)
            log.warning("hand-off of step %d skipped, out of memory: %s", step, detail)
            return None
        blocked = time.perf_counter() - t0
        self.jobs.put((step, epoch, sorted(states), slot, blocked))
        self.submitted.append(step)
        self.blocked_s.append(blocked)
        return blocked

    def _free_slot(self, step: int) -> Optional[_Slot]:
        """A slot of its own; None (skipped) when both are still being written under policy=latest."""
        if not self.free.empty() or self.policy == "all":  # policy=all: every snapshot must reach the validator
            return self.free.get()
        self.rundir.skip(step, "busy", "the previous snapshots were still being written"
                         + (f" (rank {self.rank})" if self.world else ""))
        log.warning("hand-off of step %d skipped: the writer is still busy", step)
        return None

    def _give_back(self, slot: _Slot, emptied: bool = False) -> None:
        """Done with a slot (`emptied`: an OOM; its buffers are allocated again when next used)."""
        if emptied:
            slot.host, slot.ready = {}, None
        slot.release() if slot.release is not None else self.free.put(slot)

    def _copy(self, states: Dict[str, Dict[str, torch.Tensor]], slot: _Slot) -> None:
        flat, slot.layouts = self._flat(states)
        if slot.host.keys() != flat.keys() or any(slot.host[k].shape != v.shape or slot.host[k].dtype != v.dtype
                                                  for k, v in flat.items()):
            self._allocate(slot, flat)  # not prepared for these states (or an OOM emptied the slot)
        src, dst = list(flat.values()), list(slot.host.values())
        if not self.cuda:
            torch._foreach_copy_(dst, src)  # CPU training: a memcpy is the whole cost
            slot.ready = None
            return
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)  # the weights as of now
        with torch.cuda.stream(self.side):
            torch._foreach_copy_(dst, src, non_blocking=True)  # device to pinned host, no staging copy
            slot.ready = torch.cuda.Event()
            slot.ready.record(self.side)
        self.pending = slot.ready
        if "raw" in states:  # the next forward updates BatchNorm buffers: wait right away (GPU side)
            self.fence()

    def fence(self) -> None:
        """Before the weights handed off last change (the next EMA update): the training stream waits on
        the device for the copy to host. Free when it finished long ago; no host sync either way."""
        if self.pending is not None:
            torch.cuda.current_stream().wait_event(self.pending)
            self.pending = None

    def _write_loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            step, epoch, kinds, slot, blocked = job
            t0 = time.perf_counter()
            try:
                if slot.ready is not None:
                    slot.ready.synchronize()
                published = self._write(step, epoch, kinds, slot) if self.world is None \
                    else self._write_piece(step, epoch, kinds, slot)
                if self.policy == "latest" and published:  # drop() is a rename: of two droppers one wins
                    for old in pending(self.dir)[:-self.keep]:
                        drop(self.dir, old, "stale")
                if self.on_written is not None:
                    self.on_written(step, blocked, time.perf_counter() - t0)
            except Exception:  # a full disk must not kill training; the step shows up as unvalidated
                log.exception("hand-off of step %d failed", step)
                self.rundir.skip(step, "write_failed")
            finally:
                self._give_back(slot)
                self.jobs.task_done()

    def _write(self, step: int, epoch: int, kinds: List[str], slot: _Slot) -> bool:
        meta, out = {"step": str(step), "epoch": str(epoch), "weights": ",".join(kinds)}, []
        atomic_write(data_path(self.dir, step), lambda f: out.append(write_safetensors(f, slot.host, meta)))
        (sha256, size), = out
        write_json(manifest_path(self.dir, step), vars(Manifest(
            step, epoch, kinds, data_path(self.dir, step).name, sha256, size, time.time())))
        return True

    def _write_piece(self, step: int, epoch: int, kinds: List[str], slot: _Slot) -> bool:
        """This rank's piece; the last rank to finish publishes the manifest (no collective) and, like
        the single writer, drops what is stale. True when this rank published the snapshot."""
        return handoff_shards.write_and_publish(self.dir, step, epoch, kinds, slot.host, slot.layouts, self.rank,
                                                self.world)

    def flush(self) -> None:
        """Wait until every snapshot is on disk (used once, after training)."""
        self.jobs.put(None)
        self.thread.join()


# ---------------------------------------------------------------- validator side

@dataclass
class Snapshot:
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


def claim(directory: Path, policy: str) -> Optional[Snapshot]:
    """The next snapshot to validate: the oldest (policy=all) or the newest, dropping older ones (latest)."""
    steps = pending(directory)
    for step in (reversed(steps) if policy == "latest" else steps):
        if _transition(directory, step, "json", "claimed"):
            if policy == "latest":
                for old in steps:
                    if old < step:
                        drop(directory, old, "stale")
            handoff_shards.sweep(directory, below=step)  # older sharded steps still incomplete never will be
            return Snapshot(Path(directory), step)
    return None


def recover(directory: Path) -> None:
    """A validator that died holding a claim: give its snapshot back to the queue."""
    for p in Path(directory).glob("*.claimed"):
        os.replace(p, p.with_suffix(".json"))
