"""Exponential moving average of a model's weights: v = d*v + (1-d)*w.

Averages every floating tensor of the state dict (parameters and BatchNorm
statistics) in fp32 and copies integer buffers (num_batches_tracked) instead of
averaging them. The average of each (device, dtype) group of source tensors lives
in ONE flat buffer; `shadow` holds per-tensor views into it (same shapes and
strides as the sources, so foreach calls take their fast route). An update is a
few fused calls per group, never a Python loop over tensors, and no host-device
synchronization: the decay is computed on the host from `updates`.

Sharded (FSDP2) models: the EMA covers this rank's shards only (memory ~1/N): the
flat buffers hold the local tensors, and `shadow` wraps each view of a sharded
parameter in a DTensor with the parameter's mesh and placements (no copy), so
`state_dict()` can be saved and resharded by torch.distributed.checkpoint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from launcher.distributed.shards import is_sharded, local_and_layout, local_slice, replicated


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


def _views(flat: torch.Tensor, like: List[torch.Tensor]) -> List[torch.Tensor]:
    """Per-tensor views of `flat`, back to back, each with the shape and strides of its model tensor."""
    out, offset = [], 0
    for t in like:
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or \
            (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
        stride = t.stride() if dense else torch.empty(t.shape, device="meta").stride()
        out.append(flat.as_strided(t.shape, stride, offset))
        offset += t.numel()
    return out


def _like(view: torch.Tensor, model_value: torch.Tensor) -> torch.Tensor:
    """`view` as the shadow holds it: a DTensor (aliasing `view`) for a sharded model tensor, else itself."""
    if not is_sharded(model_value):
        return view
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(view, model_value.device_mesh, model_value.placements, shape=model_value.shape,
                              stride=model_value.stride(), run_check=False)


@dataclass
class _Group:
    """The state tensors of one (device, dtype): the flat average, its views, the model's tensors, and
    (for low-precision weights and the gated update) a flat staging buffer the sources are gathered into."""
    flat: torch.Tensor
    views: List[torch.Tensor]
    src: List[torch.Tensor]
    averaged: bool  # floating: lerp; integer: copy
    stage: Optional[torch.Tensor] = None
    stage_views: Optional[List[torch.Tensor]] = None

    def staging(self) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if self.stage is None:
            self.stage = torch.empty_like(self.flat)
            self.stage_views = _views(self.stage, self.src)
        return self.stage, self.stage_views


class EMA:
    """The fp32 moving average of `model`'s state (this rank's shards under FSDP2), updated once per
    optimizer step (every `ema.every`) by `update(model, skip)` and read as `shadow` ({name: tensor},
    the model's keys and shapes). Build it after the model is on its device and sharded (its buffers
    follow the model's tensors as they are then) and before DDP or compile wrap it: it reads the model's
    own state_dict. The decay ramps up (`ramp`, `tau`) with the number of updates, counted on the host;
    `updates` and `skipped` read a device flag (a host sync) where a gated update's was not read yet."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, ramp: str = "exp", tau: float = 2000.0):
        self.decay, self.ramp, self.tau = decay, str(ramp), tau  # plain values: checkpoints load weights_only
        self._pending: Optional[torch.Tensor] = None  # skips decided on the device, not yet counted
        self.updates = 0
        self.skipped = 0
        self.shadow: Dict[str, torch.Tensor] = {}
        self._bind(model, model.state_dict())

    @torch.no_grad()
    def _bind(self, model: nn.Module, values: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Lay the average out in one flat buffer per (device, dtype) group of `model`'s state (its local
        shards under FSDP), starting from `values` (default: the current average), and cache the tensor
        lists update() works on."""
        values = self.shadow if values is None else values
        sd = model.state_dict(keep_vars=False)
        local = {k: local_and_layout(v)[0] for k, v in sd.items()}
        names: Dict[Tuple[torch.device, torch.dtype], List[str]] = {}
        for k, src in local.items():
            names.setdefault((src.device, src.dtype), []).append(k)
        self._groups: List[_Group] = []
        shadow: Dict[str, torch.Tensor] = {}
        for (device, dtype), keys in names.items():
            src = [local[k] for k in keys]
            flat = torch.empty(sum(s.numel() for s in src), device=device,
                               dtype=torch.float32 if dtype.is_floating_point else dtype)
            views = _views(flat, src)
            torch._foreach_copy_(views, [local_and_layout(values[k].detach())[0] for k in keys])
            shadow.update((k, _like(v, sd[k])) for k, v in zip(keys, views))
            self._groups.append(_Group(flat, views, src, dtype.is_floating_point))
        self.shadow = {k: shadow[k] for k in sd}  # the model's key order
        self._gather: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]] = None
        self._model_ref = model

    def decay_at(self, n: int) -> float:
        return decay_at(n, self.decay, self.ramp, self.tau)

    @torch.no_grad()
    def update(self, model: nn.Module, skip: "bool | torch.Tensor" = False) -> None:
        """Move the average towards `model`. `skip` (a step the GradScaler skipped, a
        non-finite loss) leaves it untouched and does not advance the ramp. A 0-d bool
        *tensor* `skip` on a GPU is decided there, so the step needs no host-device sync; one on
        the host is simply read (that waits for no device)."""
        if isinstance(skip, torch.Tensor):
            skip = replicated(skip)  # fsdp: a DTensor flag (see step.nonfinite)
            if skip.device.type == "cpu":
                return self.update(model, skip=bool(skip))
            return self._update_gated(model, skip)
        if skip:
            self.skipped += 1
            return
        if model is not self._model_ref:
            self._bind(model)
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        for g in self._groups:
            if not g.averaged:
                torch._foreach_copy_(g.views, g.src)
            elif g.src[0].dtype == torch.float32:
                torch._foreach_lerp_(g.views, g.src, weight)
            else:  # bf16/fp16 weights: gathered into fp32 staging by one call, averaged by one lerp
                stage, stage_views = g.staging()
                torch._foreach_copy_(stage_views, g.src)
                g.flat.lerp_(stage, weight)

    def _update_gated(self, model: nn.Module, skip: torch.Tensor) -> None:
        """The gate decided on the device (a GPU's flag). One `_foreach_copy_` gathers every
        source tensor into the groups' flat staging buffers; then per group one lerp into the
        staging buffer and one `where` that keeps the average where the step is skipped. A
        skipped step rewrites the average with its own bits (NaN or inf weights never enter,
        -0.0 stays -0.0); a kept one is bit-identical to the host path. The counters are
        settled from the device when read; until then the ramp assumes the step was not
        skipped. `skip` may live on any device (tests run this path on the CPU) and may be a
        DTensor (fsdp: the norm of sharded gradients); `where(..., out=)` needs a plain tensor."""
        skip = replicated(skip)
        if model is not self._model_ref:
            self._bind(model)
        if self._gather is None:
            dst, src = [], []
            for g in self._groups:
                dst += g.staging()[1]
                src += g.src
            self._gather = (dst, src)
        self._updates += 1
        weight = 1.0 - self.decay_at(self._updates)
        torch._foreach_copy_(*self._gather)
        for g in self._groups:
            if g.averaged:
                torch.lerp(g.flat, g.stage, weight, out=g.stage)
            torch.where(skip, g.flat, g.stage, out=g.flat)
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
        """The average and its counters (settled: a host sync where a gated update's flag is unread).
        Sharded values are DTensors over *copies* of the local views: torch.save cannot pickle a DTensor
        whose local tensor starts inside its storage (torch 2.13), and the views sit back to back in one
        flat buffer. Load with `load_state_dict`, not in place."""
        shadow = {k: _like(local_and_layout(v)[0].clone(), v) if is_sharded(v) else v for k, v in self.shadow.items()}
        return {"shadow": shadow, "updates": self.updates, "skipped": self.skipped,
                "decay": self.decay, "ramp": self.ramp, "tau": self.tau}

    def snapshot_state(self) -> dict:
        """The state as a checkpoint's snapshot takes it (checkpoint/staging.py copies every tensor itself):
        the shadow's own tensors, no copy, and the counters without a host sync: `pending` counts, on the
        device, the gated updates whose skip flag was not read yet (load_state_dict settles it). The
        snapshot's copy reads the shadow until the training step's fence, before the next update."""
        return {"shadow": dict(self.shadow), "updates": self._updates, "skipped": self._skipped,
                "pending": torch.zeros((), dtype=torch.long) if self._pending is None else self._pending,
                "decay": self.decay, "ramp": self.ramp, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        """Values as saved (plain or DTensors of this layout, e.g. loaded by DCP into `state_dict()`), or
        full plain tensors into a sharded EMA (a ddp checkpoint): each rank takes its own rows."""
        for k, v in state["shadow"].items():  # once, at resume: a checkpoint's tensors may live on the CPU
            dst = self.shadow[k]
            if is_sharded(v):  # another layout (DCP normally reshards for us): all-gather, take our rows
                same = local_and_layout(v)[1] == local_and_layout(dst)[1]
                v = v.to_local() if same else local_slice(v.full_tensor(), dst)
            elif is_sharded(dst):
                v = local_slice(v, dst)
            local_and_layout(dst)[0].copy_(v)
        pending = int(state.get("pending", 0))  # skipped gated updates counted in `updates` (snapshot_state)
        self.updates = int(state["updates"]) - pending
        self.skipped = int(state.get("skipped", 0)) + pending

    def nbytes(self) -> int:
        """The memory the average takes on this rank (its shards only under FSDP)."""
        return sum(g.flat.numel() * g.flat.element_size() for g in self._groups)

    @property
    def current_decay(self) -> float:
        return self.decay_at(self.updates)

    def describe(self) -> str:
        mb, sharded = self.nbytes() / 2**20, sum(is_sharded(v) for v in self.shadow.values())
        where = f" ({sharded} of them this rank's shards)" if sharded else ""
        return f"EMA kept on this rank: {len(self.shadow)} tensors{where}, {mb:.4f} MB fp32, tau {self.tau:.0f}"

    def stats(self) -> dict:
        """For metrics rows and the summary."""
        return {"ema_decay": self.current_decay, "ema_updates": self.updates, "ema_skipped": self.skipped}


class NoEMA:
    """No EMA here (ema.enabled=false, or under ddp a training rank other than 0): every call does nothing."""
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
