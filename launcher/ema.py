"""Exponential moving average of a model's weights: v = d*v + (1-d)*w.

Averages every floating tensor of the state dict (parameters and BatchNorm
statistics) in fp32 and copies integer buffers (num_batches_tracked) instead of
averaging them. One fused `_foreach_lerp_` per (device, dtype) group and no
host-device synchronization: the decay is computed on the host from `updates`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn


def decay_at(n: int, decay: float, ramp: str, tau: float) -> float:
    """Decay in force for the n-th update (n counts from 1)."""
    if ramp == "exp":  # YOLOv5: close to the raw weights early on
        return decay * (1.0 - math.exp(-n / tau))
    if ramp == "tf":  # TensorFlow's ExponentialMovingAverage(num_updates=n)
        return min(decay, (1.0 + n) / (10.0 + n))
    if ramp == "none":
        return decay
    raise ValueError(f"ramp={ramp!r}; choose exp, tf or none")


def auto_tau(total_steps: int, window: float = 0.05) -> float:
    """`ema.tau` when unset: the exp ramp's time constant that makes the average at the end of a
    run of `total_steps` span about `window` of it (5%: the last 300 of 6000 steps).

    At the last step the decay is d*(1-exp(-T/tau)), so the average spans 1/(1-decay) steps;
    exp(-T/tau) = 1/(window*T) gives tau = T/ln(window*T). On long runs `ema.decay` caps the
    span first (0.9999: 10k steps), as with a fixed tau. Pure: the same T gives the same tau."""
    return max(1.0, total_steps / max(1.0, math.log(max(1.0, window * total_steps))))


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, ramp: str = "exp", tau: float = 2000.0):
        self.decay, self.ramp, self.tau = decay, str(ramp), tau  # plain values: checkpoints load weights_only
        self._pending: Optional[torch.Tensor] = None  # skips decided on the device, not yet counted
        self.updates = 0
        self.skipped = 0
        sd = model.state_dict()
        self.shadow: Dict[str, torch.Tensor] = {
            k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in sd.items()}
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        """Cache the (ema, source) tensor lists per group so update() does no dict walking."""
        sd = model.state_dict(keep_vars=False)
        groups: Dict[Tuple[torch.device, torch.dtype], Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
        self._ints: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])
        for k, src in sd.items():
            if src.is_floating_point():
                ema, srcs = groups.setdefault((src.device, src.dtype), ([], []))
                ema.append(self.shadow[k])
                srcs.append(src)
            else:
                self._ints[0].append(self.shadow[k])
                self._ints[1].append(src)
        self._groups = list(groups.items())
        self._model_ref = model

    def decay_at(self, n: int) -> float:
        return decay_at(n, self.decay, self.ramp, self.tau)

    @torch.no_grad()
    def update(self, model: nn.Module, skip: "bool | torch.Tensor" = False) -> None:
        """Move the average towards `model`. `skip` (a step the GradScaler skipped, a
        non-finite loss) leaves it untouched and does not advance the ramp. A 0-d bool
        *tensor* `skip` is decided on the device, so the step needs no host-device sync."""
        if isinstance(skip, torch.Tensor):
            return self._update_gated(model, skip)
        if skip:
            self.skipped += 1
            return
        if model is not self._model_ref:
            self._bind(model)
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        for (_, dtype), (ema, src) in self._groups:
            if dtype != torch.float32:  # bf16/fp16 weights: average in fp32
                src = [s.float() for s in src]
            torch._foreach_lerp_(ema, src, weight)
        if self._ints[0]:
            torch._foreach_copy_(self._ints[0], self._ints[1])

    def _update_gated(self, model: nn.Module, skip: torch.Tensor) -> None:
        """Where the step is skipped every source is swapped for the average itself, so
        lerp(v, v) leaves v bit-exact (a NaN weight never enters); where it is not, the
        result is bit-identical to the host path. Costs one `where` pass over the weights
        (it replaces the fp32 cast for bf16/fp16 weights). The counters are settled from the
        device when read; until then the ramp assumes the step was not skipped."""
        if model is not self._model_ref:
            self._bind(model)
        self._updates += 1
        weight = 1.0 - self.decay_at(self._updates)
        keep = ~skip
        for _, (ema, src) in self._groups:
            torch._foreach_lerp_(ema, [torch.where(keep, s, e) for s, e in zip(src, ema)], weight)
        if self._ints[0]:
            torch._foreach_copy_(self._ints[0], [torch.where(keep, s, e) for s, e in zip(self._ints[1], self._ints[0])])
        self._pending = skip.long() if self._pending is None else self._pending + skip

    def _settle(self) -> None:
        if self._pending is not None:
            n, self._pending = int(self._pending.item()), None
            self._updates, self._skipped = self._updates - n, self._skipped + n

    @property
    def updates(self) -> int:
        self._settle()
        return self._updates

    @updates.setter
    def updates(self, n: int) -> None:
        self._settle()
        self._updates = n

    @property
    def skipped(self) -> int:
        self._settle()
        return self._skipped

    @skipped.setter
    def skipped(self, n: int) -> None:
        self._settle()
        self._skipped = n

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (its own dtypes kept)."""
        model.load_state_dict(self.shadow, strict=True)

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow), "updates": self.updates, "skipped": self.skipped,
                "decay": self.decay, "ramp": self.ramp, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])
        self.skipped = int(state.get("skipped", 0))

    @property
    def current_decay(self) -> float:
        return self.decay_at(self.updates)

    def describe(self) -> str:
        mb = sum(v.numel() * v.element_size() for v in self.shadow.values()) / 2**20
        return f"EMA kept on this rank: {len(self.shadow)} tensors, {mb:.2f} MB fp32, tau {self.tau:.0f}"

    def stats(self) -> dict:
        """For metrics rows and the summary."""
        return {"ema_decay": self.current_decay, "ema_updates": self.updates, "ema_skipped": self.skipped}


class NoEMA:
    """No EMA here (ema.enabled=false, or a training rank other than 0): every call does nothing."""
    shadow: Dict[str, torch.Tensor] = {}

    def update(self, model: nn.Module, skip: "bool | torch.Tensor" = False) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass

    def describe(self) -> str:
        return "EMA: none on this rank"

    def stats(self) -> dict:
        return {}
