"""Speed options, kept out of the training loop: the DDP wrapper, torch.compile, the loader.

Each is a plain function of the config so the loop reads the same with or without
them. What each one buys is measured by `benchmarks/overhead.py` (see
benchmarks/RESULTS.md).
"""
from __future__ import annotations

from typing import Iterator, List

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Sampler

from launcher.schema import Config, DataConfig


def wrap(model: nn.Module, cfg: Config, group, device: torch.device) -> nn.Module:
    """The module the loop calls forward on: DDP (with the bucket settings) around `model`
    when `group` is a training group of 2+ ranks, else `model` itself; compiled in place
    with `train.compile`. Compiling the DDP wrapper, not the bare model, keeps DDP's
    compute/communication overlap (dynamo splits the graph at bucket boundaries), and
    compiling in place keeps `model.state_dict()` keys and `ddp.no_sync()` unchanged."""
    net = model
    if group is not None:
        net = DDP(model, process_group=group, device_ids=[device.index] if device.type == "cuda" else None,
                  bucket_cap_mb=cfg.ddp.bucket_cap_mb, gradient_as_bucket_view=cfg.ddp.gradient_as_bucket_view,
                  static_graph=cfg.ddp.static_graph)
    if cfg.train.compile:
        net.compile()
    return net


def loader_options(cfg: DataConfig, device: torch.device) -> dict:
    """DataLoader keyword arguments: pinned memory for a GPU, persistent prefetching workers."""
    opts = {"num_workers": cfg.workers, "pin_memory": cfg.pin_memory and device.type == "cuda"}
    if cfg.workers > 0:
        opts.update(persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch)
    return opts


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


def grad_norm(model: nn.Module) -> torch.Tensor:
    """Total 2-norm of the model's gradients, on their device: one foreach norm, no host sync."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def nonfinite(value: torch.Tensor) -> "torch.Tensor | bool":
    """Whether the EMA must skip this step, from a value every training rank agrees on (the norm of the
    synced gradients). On a GPU a 0-d device tensor, so no host-device sync in the step (the EMA gates
    on the device); on the CPU a bool (reading it is free)."""
    flag = ~torch.isfinite(value)
    return flag if value.is_cuda else bool(flag)
