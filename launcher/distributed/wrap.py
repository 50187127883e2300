"""The model as the loop runs it: backend flags, FSDP2 sharding, the DDP wrapper, torch.compile.

Each is a plain function of the config so the loop reads the same with or without
them. What each one buys is measured by `benchmarks/overhead.py` (see
benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.distributed import fsdp
from launcher.config.checks import FSDP_FP16
from launcher.config.schema import Config, TrainConfig
from launcher.errors import ConfigError


def backend_flags(cfg: TrainConfig) -> None:
    """The cuDNN autotuner (`train.cudnn_benchmark`) and TF32 matmuls and convolutions (`train.tf32`):
    set by the trainer and, for its own evaluation, by the validator."""
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32


def setup(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Once, at start, before the batch probe (its memory depends on them): the backend flags, and NHWC
    weights with `train.channels_last` (inputs are converted in their copy to the device, in the loop)."""
    backend_flags(cfg)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def shard(model: nn.Module, strategy: str, group, device: torch.device, precision: str, job) -> nn.Module:
    """train.strategy=fsdp with a training group of 2+ ranks: `model` sharded in place by FSDP2
    (fsdp.py), before the batch probe, so the probe measures the sharded step; else `model`."""
    if strategy != "fsdp":
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
