"""Loading: the training loader's sample order and both loaders' options.

`EpochIndices` rather than torchdata's StatefulDataLoader: the position inside an epoch is
one integer of the checkpoint (`batch_in_epoch`), and slicing the DistributedSampler's order
there resumes exactly, with any number of loader workers, in fifteen lines.
"""
from __future__ import annotations

from typing import Iterator, List

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
