"""Optimizer and LR schedule: AdamW/SGD, no decay on biases and norms, warmup then cosine.

The schedule is a `LambdaLR` with one factor per parameter group, so the YOLO-style
bias-LR warmup is just another group's lambda and the whole schedule resumes from
the scheduler's own state dict. Momentum warmup is a pure function of the step.
A checkpoint restores the optimizer's and the scheduler's *settings* along with their state;
`Settings` puts the config's back, so a resume that changes `optim.*` applies it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from launcher.config.schema import OptimConfig, SchedConfig
from launcher.distributed.shards import is_sharded


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    decay, no_decay, bias = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias"):
            bias.append(p)
        elif p.ndim <= 1:  # norm weights and other vectors
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
            {"name": "bias", "params": bias, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD, fused on CUDA by default (`optim.fused`). Fused SGD has no sharding rule for
    DTensor parameters (fsdp: "aten._fused_sgd_ does not have a sharding strategy"; fused AdamW has
    one), so sharded SGD defaults to foreach; `optim.fused=true` with it is refused in checks.py."""
    groups = param_groups(model, cfg.weight_decay)
    sharded_sgd = cfg.name == "sgd" and any(is_sharded(p) for g in groups for p in g["params"])
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda" and not sharded_sgd
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, cfg.beta2), eps=cfg.eps, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           fused=fused)


def warmup_steps(cfg: SchedConfig, steps_per_epoch: int) -> int:
    return cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch)


def lr_factor(step: int, warmup: int, total: int, min_lr: float) -> float:
    """Multiplier of the base LR after `step` optimizer steps: linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (1.0 - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: SchedConfig, base_lr: float, total: int,
                    warmup: int) -> LambdaLR:
    main = lambda s: lr_factor(s, warmup, total, cfg.min_lr)  # noqa: E731
    lambdas = []
    for group in opt.param_groups:
        if group["name"] == "bias" and cfg.warmup_bias_lr is not None and warmup > 0:
            start, end = cfg.warmup_bias_lr / base_lr, lr_factor(warmup, warmup, total, cfg.min_lr)
            lambdas.append(lambda s, a=start, b=end: a + (b - a) * s / warmup if s < warmup else main(s))
        else:
            lambdas.append(main)
    return LambdaLR(opt, lambdas)


def set_momentum(opt: torch.optim.Optimizer, cfg: SchedConfig, target: float, step: int, warmup: int) -> None:
    """YOLO-style momentum warmup: rises linearly from warmup_momentum to the target."""
    if cfg.warmup_momentum is None or warmup == 0:
        return
    m = target if step >= warmup else cfg.warmup_momentum + (target - cfg.warmup_momentum) * step / warmup
    for group in opt.param_groups:
        if "betas" in group:
            group["betas"] = (m, group["betas"][1])
        else:
            group["momentum"] = m


@dataclass
class Settings:
    """The hyperparameters the config gave the optimizer (per group: lr, weight decay, betas or momentum, eps,
    nesterov, fused, ...) and the scheduler (base LRs). `load_state_dict` brings back the previous launch's;
    taken before a restore and applied after it, the config wins: a resume with a changed `optim.*` trains with
    it (config/history.py announces the change). Unchanged, the values equal the checkpoint's: exact resume."""
    groups: List[dict]
    base_lrs: List[float]

    @classmethod
    def of(cls, opt: torch.optim.Optimizer, sched: LambdaLR) -> "Settings":
        return cls([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups], list(sched.base_lrs))

    def apply(self, opt: torch.optim.Optimizer, sched: LambdaLR) -> None:
        """After a restore: the config's settings, and the LR in force at the restored step recomputed from them
        (the expression LambdaLR.get_lr uses, so an unchanged LR is bit-identical)."""
        sched.base_lrs = list(self.base_lrs)
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, settings, lr in zip(opt.param_groups, self.groups, lrs):
            group.update(settings, lr=lr)
        sched._last_lr = lrs
