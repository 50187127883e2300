"""One training step: forward and backward over the micro-batches, then the optimizer step.

Also the flags the EMA gates on, read without a host-device sync on a GPU, and the loss meter.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from launcher.batch.recovery import Recovery
from launcher.distributed.groups import Dist
from launcher.distributed.wrap import GradSync
from launcher.distributed.shards import replicated
from launcher.optim import set_momentum
from launcher.precision import autocast

if TYPE_CHECKING:
    from launcher.ema import EMA, NoEMA


class LossMeter:
    """Mean loss and throughput since the last log line; the loss sum is per-rank checkpoint state."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sum, self.count, self.samples, self.since = torch.zeros((), device=device), 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.sum += loss
        self.count += 1
        self.samples += samples

    def take(self, dist: Dist, world: int) -> dict:
        """The mean over the training ranks (one all-reduce), then start again."""
        mean = dist.all_reduce(self.sum / max(self.count, 1)) / world
        now = time.perf_counter()
        row = {"loss": float(mean), "samples_per_s": self.samples / (now - self.since)}
        self.sum, self.count, self.samples, self.since = torch.zeros((), device=self.device), 0, 0, now
        return row

    def state_dict(self) -> dict:
        """The sum stays where it is (a checkpoint's snapshot copies it without a host sync)."""
        return {"loss_sum": self.sum.detach(), "loss_count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sum, self.count = state["loss_sum"].to(self.device), state["loss_count"]


@dataclass
class StepParts:
    """What an optimizer step updates besides the model; the batch probe's trial uses throwaway ones."""
    opt: torch.optim.Optimizer
    sched: LRScheduler
    scaler: torch.amp.GradScaler
    ema: "EMA | NoEMA"
    warmup: int = 0  # warmup steps: momentum warmup follows them


def forward_backward(x: torch.Tensor, y: torch.Tensor, recovery: Recovery, grads: GradSync, wrapped: nn.Module,
                     job, scaler: torch.amp.GradScaler, device: torch.device, precision: str,
                     step: int) -> torch.Tensor:
    """The step batch's gradients, micro-batch by micro-batch (`recovery.batch.micro`) through `wrapped` (the
    module the loop calls: DDP around the model, or the model itself); returns its (detached) mean loss.
    Gradients are synchronized in the last backward only (`grads`, distributed/wrap.GradSync); the ranks
    agree once, just before it (see batch/recovery.py)."""
    step_loss = torch.zeros((), device=device)
    xs, ys = x.split(recovery.batch.micro), y.split(recovery.batch.micro)
    with recovery.attempt(step, grads) as attempt:  # an OOM before the agreement skips this rank's rest, straight to it
        for i, (xb, yb) in enumerate(zip(xs, ys)):
            sync = grads.syncs(last=i == len(xs) - 1)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with attempt.phase("forward"), grads.forward(sync), autocast(device, precision):
                loss = job.loss(wrapped(xb), yb) * (len(xb) / len(x))
            if sync:
                attempt.agree()  # any OOM so far on any rank, or too little memory for this backward: StepOOM
            with attempt.phase("last backward" if sync else "backward"):
                grads.backward_begins(sync)
                scaler.scale(loss).backward()
            step_loss += loss.detach()
    return step_loss


def optimizer_step(model: nn.Module, parts: StepParts, cfg, step: int, gate: bool):
    """Clip, step, schedule. With `gate`, also whether the EMA must skip this step: with fp16 the scaler
    lowered its scale (an overflow), else the synced gradients are not finite (a NaN loss on any rank
    reaches every rank's gradients, not every rank's loss). A 0-d bool tensor on the model's device
    (EMA.update gates on it there: no sync in the step), or False without `gate`."""
    opt, scaler = parts.opt, parts.scaler
    norm = None
    if cfg.train.grad_clip:
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    set_momentum(opt, cfg.sched, cfg.optim.momentum, step, parts.warmup)
    scale_before = scale_of(scaler) if gate else None  # fp16: the scale on the device (no host sync)
    bad = nonfinite(grad_norm(model) if norm is None else norm) if gate and scale_before is None else False
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    parts.sched.step()
    return scaler_skipped(scaler, scale_before) if gate and scale_before is not None else bad


def grad_norm(model: nn.Module) -> torch.Tensor:
    """Total 2-norm of the model's gradients, on their device, no host sync (torch's get_total_norm: one
    foreach norm). Under fsdp the gradients are DTensors and so is their norm: see `nonfinite`."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())


def scale_of(scaler: torch.amp.GradScaler) -> "torch.Tensor | None":
    """fp16: a device copy of the GradScaler's scale (no host sync, unlike `get_scale()`); else None."""
    return scaler._scale.clone() if scaler.is_enabled() and scaler._scale is not None else None


def scaler_skipped(scaler: torch.amp.GradScaler, before: torch.Tensor) -> torch.Tensor:
    """After `scaler.update()`: whether it skipped the step (found inf or NaN, so it lowered the scale),
    as a 0-d bool tensor on the scale's device, compared there (no sync)."""
    return scaler._scale < before


def nonfinite(value: torch.Tensor) -> torch.Tensor:
    """Whether the EMA must skip this step, from a value every training rank agrees on (the norm of the
    synced gradients): a plain 0-d bool tensor on the value's device, so the EMA gates on the device
    (no host-device sync in the step). Under fsdp the norm is a DTensor (Partial or Replicate): its full
    value is taken first (`full_tensor()`: an all-reduce where Partial), so every rank skips the same
    steps and the flag is a plain tensor, which the device gate's `where(..., out=)` needs."""
    return ~torch.isfinite(replicated(value))
