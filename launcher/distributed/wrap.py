"""The model as the loop runs it: backend flags, FSDP2 sharding, the DDP wrapper, torch.compile, and
when a step's backwards synchronize gradients (`GradSync`).

Each is a plain function of the config so the loop reads the same with or without
them. What each one buys is measured by `benchmarks/overhead.py` (see
benchmarks/RESULTS.md).
"""
from __future__ import annotations

from contextlib import nullcontext

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


def prepare(model: nn.Module, cfg: TrainConfig) -> nn.Module:
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


def for_loop(model: nn.Module, cfg: Config, group, device: torch.device) -> nn.Module:
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


class GradSync:
    """When a step's backwards synchronize gradients, and the wrapper's state around a step that was
    given up (an agreed out-of-memory error). Gradients are synchronized in the step's last backward
    only: DDP runs every other micro-batch under `no_sync()` (its backward runs no collective), FSDP2
    gets the flags its backward reads (fsdp.accumulate). Except with `ddp.static_graph`: DDP records
    the graph in the run's first backward and fails an unsynced one before it, so until then every
    backward syncs. `probe` (the batch probe's trial): no backward synchronizes."""

    def __init__(self, module: nn.Module, probe: bool = False):
        self.module, self.probe = module, probe
        self.sharded = fsdp.is_fsdp(module)
        self.recording = bool(getattr(module, "static_graph", False))  # DDP(static_graph=...): the graph not yet recorded

    def syncs(self, last: bool) -> bool:
        """Whether the micro-batch's backward synchronizes (`last`: the step's last micro-batch)."""
        return not self.probe and (last or self.recording)

    def forward(self, sync: bool):
        """The context the micro-batch's forward runs in. DDP: `no_sync()` unless it syncs. FSDP2: the flags
        its backward reads (after this block), set by every micro-batch for its own."""
        if self.sharded:
            fsdp.accumulate(self.module, sync)
            return nullcontext()
        return nullcontext() if sync or not hasattr(self.module, "no_sync") else self.module.no_sync()

    def backward_begins(self, sync: bool) -> None:
        """Right before a backward: a synchronized one records DDP's static graph (DDP's own flag flips there)."""
        if sync:
            self.recording = False

    def gather(self) -> None:
        """FSDP2: the step's all-gathers up front, before anything that can run out of memory, kept until the
        last backward (fsdp.unshard_for_step); nothing elsewhere."""
        if self.sharded:
            fsdp.unshard_for_step(self.module)

    def stand_in_grads(self) -> None:
        """FSDP2's probe trial: no reduce-scatter ran, the optimizer state must still be allocated."""
        if self.sharded:
            fsdp.stand_in_grads(self.module)

    def can_reset(self) -> bool:
        """Whether a step given up can be reset in place (FSDP2 on a torch without reset_iter_state cannot)."""
        return not self.sharded or fsdp.can_reset(self.module)

    def reset(self) -> None:
        """After an agreed OOM, before the redo: ranks that ran the last (synced) forward expect its backward;
        DDP's reducer is cleared (`_reset_state`: what DDP does itself when its process group changes; no
        public call does it) so the redo's no_sync backwards stay local, and the redo's first forward
        broadcasts rank 0's buffers on every rank (a rank that failed early would skip it otherwise).
        FSDP2: the gradients accumulated unsharded before the OOM are dropped."""
        if self.sharded:
            fsdp.reset_step(self.module)
        reducer = getattr(self.module, "reducer", None)
        if reducer is not None:
            reducer._reset_state()
            self.module.require_forward_param_sync = True
