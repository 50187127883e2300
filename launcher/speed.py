"""Speed options, kept out of the training loop: backend flags, the DDP wrapper, torch.compile,
the loader, and the sync-free flags the EMA gates on.

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

from launcher import fsdp
from launcher.checks import FSDP_FP16
from launcher.schema import Config, ConfigError, DataConfig, TrainConfig


def setup(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Once, at start, before the batch probe (its memory depends on them): the cuDNN autotuner
    (`train.cudnn_benchmark`), TF32 matmuls and convolutions (`train.tf32`), and NHWC weights with
    `train.channels_last` (inputs are converted in their copy to the device, in the loop)."""
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def shard(model: nn.Module, cfg: Config, group, device: torch.device, precision: str, job) -> nn.Module:
    """train.strategy=fsdp with a training group of 2+ ranks: `model` sharded in place by FSDP2
    (fsdp.py), before the batch probe, so the probe measures the sharded step; else `model`."""
    if cfg.train.strategy != "fsdp":
        return model
    if precision == "fp16":  # train.precision=auto on a GPU without bf16
        raise ConfigError(FSDP_FP16)
    return fsdp.shard(model, group, device, precision, job)


def wrap(model: nn.Module, cfg: Config, group, device: torch.device) -> nn.Module:
    """The module the loop calls forward on: DDP (with the bucket settings) around `model`
    when `group` is a training group of 2+ ranks under train.strategy=ddp, else `model` itself
    (under fsdp already sharded by `shard`); compiled in place
    with `train.compile`. Compiling the DDP wrapper, not the bare model, keeps DDP's
    compute/communication overlap (dynamo splits the graph at bucket boundaries), and
    compiling in place keeps `model.state_dict()` keys and `ddp.no_sync()` unchanged."""
    net = model
    if group is not None and cfg.train.strategy != "fsdp":
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


def scale_of(scaler: torch.amp.GradScaler) -> "torch.Tensor | None":
    """fp16: a device copy of the GradScaler's scale (no host sync, unlike `get_scale()`); else None."""
    return scaler._scale.clone() if scaler.is_enabled() and scaler._scale is not None else None


def scaler_skipped(scaler: torch.amp.GradScaler, before: torch.Tensor) -> "torch.Tensor | bool":
    """After `scaler.update()`: whether it skipped the step (found inf or NaN, so it lowered the scale).
    A device bool on a GPU, compared there (no sync); a bool on the CPU, where reading it is free."""
    flag = scaler._scale < before
    return flag if flag.is_cuda else bool(flag)


def nonfinite(value: torch.Tensor) -> "torch.Tensor | bool":
    """Whether the EMA must skip this step, from a value every training rank agrees on (the norm of the
    synced gradients). On a GPU a 0-d device tensor, so no host-device sync in the step (the EMA gates
    on the device); on the CPU a bool (reading it is free)."""
    flag = ~torch.isfinite(value)
    return flag if value.is_cuda else bool(flag)
