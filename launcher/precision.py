"""Precision: which one `auto` means on a device, and the autocast context for it.

Shared by the trainer and the validator, which may run on different devices.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU that supports it, fp16 on an older one, fp32 on the CPU."""
    if precision != "auto":
        return str(precision)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """`precision` is already resolved (fp32, bf16 or fp16)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class GradScaler(torch.amp.GradScaler):
    """torch's GradScaler, resumable into fp16 from a run that did not use it: a checkpoint saved without fp16
    holds an empty scaler state, and this scaler then starts at its default scale instead of refusing it.
    `snapshot_state()` is its state for a checkpoint's snapshot without a host sync (state_dict() calls
    .item() on the scale); load_state_dict takes either."""

    def snapshot_state(self) -> dict:
        """The scale and growth tracker as they are, device tensors (the snapshot copies them; scaler.update()
        rewrites them in place, so the training step fences the copy before it steps)."""
        if not self.is_enabled() or self._scale is None:
            return self.state_dict()
        return {"scale": self._scale.reshape(()), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker.reshape(())}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            super().load_state_dict({k: v.item() if torch.is_tensor(v) else v for k, v in state_dict.items()})
