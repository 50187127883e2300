"""A checkpoint's snapshot: the training state copied into host buffers that are allocated once.

The training thread only copies. Every tensor of the state (model, optimizer, EMA, per-rank parts;
the local shard of a DTensor) has its place in ONE flat host buffer per dtype, pinned on a GPU
(cudaHostRegister of an exact-size allocation: the caching host allocator would round each buffer up
to a power of two), touched once when allocated, so a snapshot faults no page and allocates nothing.
Each place is a tensor that owns exactly its byte range of the buffer (torch.frombuffer), so
torch.save and DCP write it as is, without the copy they make of a view into a larger storage.
Everything else in the state (ints, floats, lists: the scheduler, param groups, RNG tuples) is
deep-copied on the host, a few KB. A part offers its state through `snapshot_state()` where it has
one (the EMA, precision.GradScaler: their own tensors, counters without a host sync), else
`state_dict()`.

On a GPU the copy runs on a side stream after the work queued so far, device to pinned host, without
a host sync: the model's buffers first (the next forward updates BatchNorm statistics, so the
training stream waits for those right away: microseconds), then the rest, which the training step
waits for on the device with `fence()`, called explicitly before its optimizer step (whether or not
the GradScaler then skips the step: its update rewrites the scale the snapshot copies). The writer
threads wait for the copy (`Snapshot.synchronize()`) before they read. On the CPU the copy is a
memcpy, done when `take()` returns. The CUDA calls sit behind `DeviceCopy(cuda=...)`, so the
ordering is tested on the CPU with a recording stand-in.

The buffers are in use until every reader of a snapshot has released its lease: the checkpoint
writer (whose save the next snapshot waits for anyway: at most one in flight) and the hand-off
writer, which copies the weights out at once and releases them before it writes its file, so no
snapshot waits for a hand-off file. `take()` waits for the leases before it copies again.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from launcher.distributed.shards import is_sharded


# ------------------------------------------------------------------------------ the state's tensors
@dataclass(frozen=True)
class _Ref:
    """Where a tensor was in the state: its index among the leaves."""
    index: int


def flatten(state: Any) -> Tuple[Any, List[torch.Tensor]]:
    """(skeleton, tensors): the state with every tensor replaced by a _Ref, and the tensors in order.
    Everything else is deep-copied, so later changes to the live state do not reach the snapshot."""
    leaves: List[torch.Tensor] = []

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            leaves.append(obj)
            return _Ref(len(leaves) - 1)
        if isinstance(obj, dict):
            return type(obj)((k, walk(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(walk(v) for v in obj)
        return copy.deepcopy(obj)

    return walk(state), leaves


def rebuild(skeleton: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """The state again, with `tensors` in the places flatten() took them from."""
    if isinstance(skeleton, _Ref):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return type(skeleton)((k, rebuild(v, tensors)) for k, v in skeleton.items())
    if isinstance(skeleton, (list, tuple)) and not hasattr(skeleton, "_fields"):
        return type(skeleton)(rebuild(v, tensors) for v in skeleton)
    return skeleton


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t


def signature(tensors: Sequence[torch.Tensor], local: Optional[Sequence[torch.Tensor]] = None) -> tuple:
    """What the buffers depend on: each tensor's dtype and (local) shape, and its sharding."""
    local = local if local is not None else [_local(t) for t in tensors]
    return tuple((t.dtype, tuple(piece.shape), is_sharded(t)) for t, piece in zip(tensors, local))


# ------------------------------------------------------------------------------------- the buffers
class HostBuffers:
    """One flat host buffer per dtype; per tensor a host tensor owning its exact byte range of it."""

    def __init__(self, like: Sequence[torch.Tensor], pin: bool):
        self.signature = signature(like)
        self.pinned: List[int] = []
        sizes: Dict[torch.dtype, int] = {}
        for t in like:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + _local(t).numel()
        self.flat = {dtype: torch.empty(n, dtype=dtype) for dtype, n in sizes.items()}
        for buf in self.flat.values():
            buf.view(torch.uint8).fill_(0)  # touch every page now, not in the first snapshot
            if pin and buf.numel():
                _register(buf)
                self.pinned.append(buf.data_ptr())
        raw = {dtype: buf.view(torch.uint8).numpy() for dtype, buf in self.flat.items()}
        offsets = dict.fromkeys(sizes, 0)
        self.host: List[torch.Tensor] = []
        for t in like:
            local = _local(t)
            n, size = local.numel(), local.element_size()
            if n == 0:
                self.host.append(torch.empty(local.shape, dtype=t.dtype))
                continue
            own = torch.frombuffer(raw[t.dtype], dtype=t.dtype, count=n, offset=offsets[t.dtype] * size)
            self.host.append(own.view(local.shape))
            offsets[t.dtype] += n
        self.staged = [_wrap(h, t) for h, t in zip(self.host, like)]  # what the writers see

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.flat.values())

    def close(self) -> None:
        for ptr in self.pinned:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self.pinned = []


def _register(buf: torch.Tensor) -> None:
    err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 1))  # portable
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of a {buf.numel() * buf.element_size() / 2**20:.0f} MiB checkpoint "
                           f"buffer failed with CUDA error {err}")


def _wrap(host: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A DTensor over the host copy of a sharded tensor's local part (same mesh, placements and global
    shape), so DCP writes it with its global offsets; a plain tensor as is."""
    if not is_sharded(like):
        return host
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(host, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                              run_check=False)


# ------------------------------------------------------------------------------------ the copying
class HostCopy:
    """The CPU: a memcpy, finished when it returns."""

    def copy(self, dst: List[torch.Tensor], src: List[torch.Tensor], early: List[bool]) -> Optional[object]:
        torch._foreach_copy_(dst, src)
        return None

    def fence(self) -> None:
        pass


class DeviceCopy:
    """A GPU: device-to-pinned-host copies on a side stream, ordered after the training stream's work so
    far and never synchronizing the host. `cuda` is torch.cuda (or a stand-in with its names, in tests)."""

    def __init__(self, device: torch.device, cuda: Any = torch.cuda):
        self.cuda = cuda
        self.side = cuda.Stream(device)
        self.pending: Optional[object] = None  # the last copy's event, until the training stream waited for it

    def copy(self, dst: List[torch.Tensor], src: List[torch.Tensor], early: List[bool]) -> object:
        host = [(d, s) for d, s in zip(dst, src) if s.device.type == "cpu"]
        if host:
            torch._foreach_copy_(*map(list, zip(*host)))
        main = self.cuda.current_stream()
        self.side.wait_stream(main)  # the state as of now
        groups = [[(d, s) for d, s, e in zip(dst, src, early) if s.device.type != "cpu" and e == first]
                  for first in (True, False)]
        events = []
        with self.cuda.stream(self.side):
            for group in groups:
                for _, s in group:  # a temporary (a counter the EMA replaces) is not reused until copied
                    s.record_stream(self.side)
                if group:
                    torch._foreach_copy_(*map(list, zip(*group)), non_blocking=True)
                events.append(self.cuda.Event())
                events[-1].record(self.side)
        main.wait_event(events[0])  # buffers the next forward updates (BatchNorm statistics): tiny, now
        self.pending = events[1]
        return events[1]

    def fence(self) -> None:
        """Before the state changes (the training step calls it before its optimizer step): the training
        stream waits, on the device, for the copy. Free when it finished long ago; no host sync either way."""
        if self.pending is not None:
            self.cuda.current_stream().wait_event(self.pending)
            self.pending = None


# ------------------------------------------------------------------------------------ the snapshot
def snapshot_state(part: Any) -> Any:
    """What a snapshot (and the template a checkpoint loads into) holds of `part`: its `snapshot_state()`
    where it offers one (tensors as they are, which the snapshot copies; counters without a host sync),
    else its `state_dict()`. Either loads back with the part's `load_state_dict()`."""
    own = getattr(part, "snapshot_state", None)
    return own() if own is not None else part.state_dict()


@dataclass
class Snapshot:
    """One step's staged state (host tensors, DTensors over them where sharded) and its readers.
    `weights`: the weights it holds, by kind (`ema`: the average, `raw`: the model), as host state
    dicts inside `state`, for a hand-off (the Checkpointer fills it)."""
    step: int
    state: Any
    done: Optional[object]  # a GPU: the copy's event; None once finished (the CPU)
    blocked_s: float = 0.0  # the training thread's time on this snapshot (the copy, waiting for buffers)
    stage: Optional["Stage"] = field(default=None, repr=False)
    weights: Dict[str, Dict[str, Any]] = field(default_factory=dict, repr=False)

    def synchronize(self) -> None:
        """Called by a reader thread before it reads: the device copy has finished (as a CUDA event's)."""
        if self.done is not None:
            self.done.synchronize()

    def lease(self) -> Callable[[], None]:
        """Keep the buffers from being overwritten until the returned function is called (once)."""
        return self.stage.lease() if self.stage is not None else (lambda: None)


class Stage:
    """The staging area of one rank: `take(state, step, early)` -> Snapshot; `fence()`, before the state
    moves; `lease()`, for a reader of the buffers."""

    def __init__(self, device: torch.device, copier: Any = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copier = copier if copier is not None else (DeviceCopy(device) if self.cuda else HostCopy())
        self.buffers: Optional[HostBuffers] = None
        self._readers = 0
        self._free = threading.Condition()

    def prepare(self, tensors: Sequence[torch.Tensor], local: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Allocate (pin, touch) the buffers for these tensors unless they fit already. Call it off the
        training thread where possible: touching 1 GB costs ~0.3 s (seconds on a VM that faults slowly)."""
        if self.buffers is None or self.buffers.signature != signature(tensors, local):
            self.wait_free()
            if self.buffers is not None:
                self.buffers.close()
            self.buffers = HostBuffers(tensors, pin=self.cuda)

    @torch.no_grad()
    def take(self, state: Any, step: int, early: Callable[[torch.Tensor], bool] = lambda t: False) -> Snapshot:
        """Copy `state` into the buffers (waiting first until no reader holds them)."""
        skeleton, tensors = flatten(state)
        local = [_local(t) for t in tensors]
        self.wait_free()
        self.prepare(tensors, local)
        done = self.copier.copy(self.buffers.host, local, [early(t) for t in tensors])
        return Snapshot(step, rebuild(skeleton, self.buffers.staged), done, stage=self)

    def fence(self) -> None:
        self.copier.fence()

    def lease(self) -> Callable[[], None]:
        with self._free:
            self._readers += 1
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                with self._free:
                    self._readers -= 1
                    self._free.notify_all()
        return release

    def wait_free(self, timeout: Optional[float] = None) -> bool:
        with self._free:
            return self._free.wait_for(lambda: self._readers == 0, timeout)

    def close(self) -> None:
        if self.buffers is not None:
            self.buffers.close()
            self.buffers = None
