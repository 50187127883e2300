"""The recipe every peer follows, and how each one measures itself (shared by the scripts in this folder).

benchmarks/peers.py reads the recipe from the launcher's own composed config (`launcher train --cfg job`)
and hands it to each script as a JSON file, so the model, data, optimizer, schedule, batch, epochs, EMA
and checkpoint cadence are the launcher's defaults rather than a copy of them. The model and data sets
come from the launcher's shipped jobs (`launcher.jobs`, the job API only), so the network is literally
the same. Nothing else of the launcher is imported: a peer script is what a user of that peer writes.

Every script records the same things the same way (`Recorder`): a (step, wall time, process CPU time)
mark every `log_every` optimizer steps after a device sync (the launcher's metrics.jsonl rows), the
seconds each validation and each checkpoint held the training loop, and each validation's EMA metrics.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler


def load(argv: Optional[List[str]] = None) -> SimpleNamespace:
    """`--recipe <json> --out <json>`: the recipe, with `out` added."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", required=True, help="JSON written by benchmarks/peers.py")
    ap.add_argument("--out", required=True, help="where this run's measurements go (JSON)")
    a = ap.parse_args(argv)
    return SimpleNamespace(**json.loads(Path(a.recipe).read_text()), out=a.out)


def make_job(r: SimpleNamespace):
    """The launcher's job (model, data sets, loss, metrics) from its `module:Class` target and fields."""
    module, cls = r.job["target"].split(":")
    return getattr(importlib.import_module(module), cls)(SimpleNamespace(**r.job))


def importable_torchvision() -> None:
    """timm and torchmetrics (Lightning) import torchvision. PyPI's torchvision is built against CUDA
    torch and fails to import beside the CPU-only torch; the images job's import knows the fix."""
    from launcher.jobs.images import vision

    vision()


def world() -> tuple:
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) without it."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))


def device(r: SimpleNamespace, local_rank: int = 0) -> torch.device:
    """The run's device, with the speed settings the launcher turns on by default on a GPU
    (train.cudnn_benchmark, train.tf32), so no side gets them and the other not."""
    if r.device != "cuda":
        return torch.device("cpu")
    dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return dev


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def autocast(dev: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """The usual split: no weight decay on biases and norm weights (1-d parameters)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def optimizer(model: nn.Module, r: SimpleNamespace, dev: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, r.weight_decay), lr=r.lr, betas=tuple(r.betas), eps=r.eps,
                             fused=dev.type == "cuda")


def schedule(opt: torch.optim.Optimizer, r: SimpleNamespace) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warmup, then cosine from 1 to `min_lr` (min_lr 1: a constant LR), stepped once
    per optimizer step."""
    def factor(step: int) -> float:
        if step < r.warmup_steps:
            return (step + 1) / r.warmup_steps
        progress = min(1.0, (step - r.warmup_steps) / max(1, r.total_steps - r.warmup_steps))
        return r.min_lr + (1.0 - r.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def ema_decay(n: int, r: SimpleNamespace) -> float:
    """The decay of the n-th EMA update (from 1): the exp ramp decay * (1 - exp(-n / tau))."""
    return r.ema_decay * (1.0 - math.exp(-max(n, 0) / r.ema_tau))


def timm_ema(model: nn.Module, r: SimpleNamespace) -> nn.Module:
    """timm's ModelEmaV3 (what Accelerate users and hand-written loops reach for), with the recipe's
    ramp in place of its own warmup: `update(model, step=n)` uses `ema_decay(n)`."""
    from timm.utils.model_ema import ModelEmaV3

    class RampedEmaV3(ModelEmaV3):
        def get_decay(self, step: Optional[int] = None) -> float:
            return self.decay if step is None else ema_decay(step, r)

    return RampedEmaV3(model, decay=r.ema_decay)


def loader(dataset, batch: int, train: bool, r: SimpleNamespace, world_size: int = 1, rank: int = 0,
           dev: torch.device = torch.device("cpu")) -> DataLoader:
    """Shuffled, whole batches for training; in order for validation. With `world_size` > 1 each rank
    reads its own shard (a DistributedSampler): what Lightning and Accelerate insert on their own."""
    opts = {"num_workers": r.workers, "pin_memory": dev.type == "cuda", "persistent_workers": r.workers > 0}
    if world_size > 1:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=train, seed=r.seed, drop_last=train)
        return DataLoader(dataset, batch, sampler=sampler, drop_last=train, **opts)
    gen = torch.Generator().manual_seed(r.seed)
    return DataLoader(dataset, batch, shuffle=train, drop_last=train, generator=gen if train else None, **opts)


@torch.no_grad()
def evaluate(model: nn.Module, batches, job, dev: torch.device, precision: str,
             total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> Dict[str, float]:
    """The job's metrics (per-batch sums) averaged over every sample; `total` sums a tensor over the
    processes that share the validation set (identity with one)."""
    was_training = model.training
    model.eval()
    sums: Dict[str, torch.Tensor] = {}
    n = torch.zeros((), device=dev)
    for x, y in batches:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with autocast(dev, precision):
            out = model(x)
        for k, v in job.metrics(out, y).items():
            sums[k] = sums.get(k, 0) + v.detach().float()
        n += len(x)
    model.train(was_training)
    n = total(n)
    return {k: float(total(v) / n) for k, v in sums.items()}


class Span:
    """Seconds from now to `stop()` (or the end of a `with` block), device synced at both ends, appended
    to `into` with the step."""

    def __init__(self, dev: torch.device, into: List[dict], step: int):
        self.dev, self.into, self.step = dev, into, step
        sync(dev)
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        sync(self.dev)
        self.into.append({"step": self.step, "seconds": time.perf_counter() - self.t0})

    def __enter__(self) -> "Span":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Recorder:
    """One run's measurements, written as JSON at the end (rank 0 only)."""

    def __init__(self, r: SimpleNamespace, system: str, dev: torch.device, rank: int = 0):
        self.r, self.system, self.dev, self.rank = r, system, dev, rank
        self.marks: List[List[float]] = []
        self.validations: List[dict] = []
        self.checkpoints: List[dict] = []
        self.results: List[dict] = []
        self.start()

    def start(self) -> None:
        """Training starts now (`train_s` counts from here)."""
        self.t0 = time.time()

    def step(self, step: int) -> None:
        """After optimizer step `step` (and its EMA update): a mark every log_every steps."""
        if step % self.r.log_every == 0 or step == self.r.total_steps:
            sync(self.dev)
            self.marks.append([step, time.time(), time.process_time()])

    def validation(self, step: int) -> Span:
        """Times a validation as the training loop sees it: from leaving the loop to coming back."""
        return Span(self.dev, self.validations, step)

    def checkpoint(self, step: int) -> Span:
        """Times a checkpoint write (several spans at one step add up)."""
        return Span(self.dev, self.checkpoints, step)

    def result(self, step: int, metrics: Dict[str, float]) -> None:
        self.results.append({"step": step, "metrics": metrics})

    def best_improved(self) -> bool:
        """Whether the last result is the best so far on the recipe's metric and goal (keep it)."""
        *before, last = [row["metrics"][self.r.metric] for row in self.results]
        if not before:
            return True
        return last > max(before) if self.r.goal == "max" else last < min(before)

    def write(self, **extra) -> None:
        if self.rank != 0:
            return
        data = {"system": self.system, "train_s": time.time() - self.t0, "threads": torch.get_num_threads(),
                "marks": self.marks, "validations": self.validations, "checkpoints": self.checkpoints,
                "results": self.results, **extra}
        Path(self.r.out).write_text(json.dumps(data) + "\n")
