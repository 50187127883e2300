"""One training step: forward and backward over the micro-batches, then the optimizer step.

Also the flags the EMA gates on, read without a host-device sync on a GPU, and the loss meter.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from launcher.batch.recovery import Recovery
from launcher.dist.groups import Dist
from launcher.optim import set_momentum
from launcher.precision import autocast


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


def forward_backward(x, y, batch, ddp, job, scaler, oom: Recovery, device, precision: str) -> torch.Tensor:
    """The step batch's gradients, micro-batch by micro-batch; returns its (detached) mean loss. DDP
    all-reduces in the last backward only; the ranks agree once, just before it (see oom.py)."""
    step_loss = torch.zeros((), device=device)
    xs, ys = x.split(batch.micro), y.split(batch.micro)
    with oom.attempt() as attempt:  # an OOM before the agreement skips this rank's rest, straight to it
        for i, (xb, yb) in enumerate(zip(xs, ys)):
            sync = oom.syncs(ddp, last=i == len(xs) - 1)  # DDP all-reduces in this backward: the last only
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with attempt.phase("forward"), oom.no_sync(ddp, sync), autocast(device, precision):
                loss = job.loss(ddp(xb), yb) * (len(xb) / len(x))
            if sync:
                attempt.agree()  # any OOM so far on any rank, or too little memory for this backward: StepOOM
            with attempt.phase("last backward" if sync else "backward"):
                scaler.scale(loss).backward()
            step_loss += loss.detach()
    return step_loss


def optimizer_step(model, opt, sched, scaler, cfg, step: int, warmup: int, gate: bool):
    """Clip, step, schedule. With `gate`, also whether the EMA must skip this step: with fp16 the scaler
    lowered its scale (an overflow), else the synced gradients are not finite (a NaN loss on any rank
    reaches every rank's gradients, not every rank's loss). A device flag on a GPU: no sync in the step."""
    norm = None
    if cfg.train.grad_clip:
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    set_momentum(opt, cfg.sched, cfg.optim.momentum, step, warmup)
    scale_before = scale_of(scaler) if gate else None  # fp16: the scale on the device (no host sync)
    bad = nonfinite(grad_norm(model) if norm is None else norm) \
        if gate and scale_before is None else False
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    sched.step()
    return scaler_skipped(scaler, scale_before) if gate and scale_before is not None else bad


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
