"""Loading: the training loader's sample order, both loaders' options, step batches onto the device.

`EpochIndices` rather than torchdata's StatefulDataLoader: the position inside an epoch is
one integer of the checkpoint (`batch_in_epoch`), and slicing the DistributedSampler's order
there resumes exactly, with any number of loader workers, in fifteen lines.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import Sampler

from launcher.config.schema import Config, DataConfig


def train_loader_options(cfg: DataConfig, device: torch.device) -> dict:
    """DataLoader keyword arguments: pinned memory for a GPU, persistent prefetching workers."""
    opts = {"num_workers": cfg.workers, "pin_memory": cfg.pin_memory and device.type == "cuda"}
    if cfg.workers > 0:
        opts.update(persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch)
    return opts


def eval_loader_options(cfg: Config, device: torch.device) -> dict:
    """The evaluation DataLoader: `validation.workers` worker processes, kept alive between validations
    (-1: `data.workers`, and at least 2 when evaluating on a GPU, so loading keeps up with it), and pinned
    batches on a GPU (`data.pin_memory`)."""
    gpu = device.type == "cuda"
    workers = cfg.validation.workers if cfg.validation.workers >= 0 else max(cfg.data.workers, 2 if gpu else 0)
    opts = {"num_workers": workers, "pin_memory": gpu and cfg.data.pin_memory}
    return {**opts, "persistent_workers": True} if workers else opts


class EpochIndices(Sampler):
    """The sample order of the current epoch, set before each epoch, so one DataLoader (and
    its persistent workers) serves the whole run, resume positions included."""

    def __init__(self) -> None:
        self.indices: List[int] = []

    def set(self, indices: List[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class DevicePrefetcher:
    """The loader's step batches, on `device`. On a GPU the next batch is copied while the current one
    computes: ahead of time, on a side stream, from the loader's pinned memory, with one event per batch;
    the compute stream waits for that event (on the device: no host sync) and `record_stream` keeps the
    caching allocator from reusing the batch's memory while the compute stream still reads it. In order
    on the compute stream, the copy of a 128x3x224x224 batch (77 MB) would take 2-4 ms of every step.
    `channels_last`: 4-d inputs become NHWC in the same copy. On the CPU the batches pass through
    (converted to NHWC where asked). Two step batches are on the device at once. `cuda`: torch.cuda, or
    a stand-in with its names (tests record the stream ordering on the CPU with one)."""

    def __init__(self, loader: Iterable, device: torch.device, channels_last: bool = False, cuda: Any = None):
        self.loader, self.device, self.nhwc = loader, device, channels_last
        self.cuda = cuda if cuda is not None else torch.cuda
        on_gpu = device.type == "cuda" or cuda is not None
        self.stream: Optional[torch.cuda.Stream] = self.cuda.Stream(device) if on_gpu else None

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.nhwc and t.ndim == 4 else torch.preserve_format
        return t.to(self.device, non_blocking=True, memory_format=fmt)

    def _ahead(self, batch) -> Tuple[tuple, "torch.cuda.Event"]:
        with self.cuda.stream(self.stream):
            out = tuple(self._to(t) for t in batch)
            done = self.cuda.Event()
            done.record(self.stream)
        return out, done

    def _ready(self, pending: Tuple[tuple, "torch.cuda.Event"]) -> tuple:
        out, done = pending
        compute = self.cuda.current_stream(self.device)
        compute.wait_event(done)
        for t in out:
            t.record_stream(compute)
        return out

    def __iter__(self) -> Iterator[tuple]:
        if self.stream is None:
            for batch in self.loader:
                yield tuple(self._to(t) for t in batch)
            return
        pending = None
        for batch in self.loader:
            ahead = self._ahead(batch)  # issued before the current batch's step: it overlaps it
            if pending is not None:
                yield self._ready(pending)
            pending = ahead
        if pending is not None:
            yield self._ready(pending)
