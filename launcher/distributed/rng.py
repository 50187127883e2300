"""Seeds and RNG states: what a checkpoint stores so that a resume draws the same numbers."""
from __future__ import annotations

import random
from typing import List, Optional, Union

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: Optional[torch.device] = None) -> dict:
    """This process's RNG states. CUDA: the state of this rank's device only (`device`, default the
    current one), so a checkpoint resumes on nodes with another number of GPUs."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's array becomes a tensor so the checkpoint loads with weights_only=True.
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    index = _cuda_index(device)
    if index is not None:
        state["cuda"] = torch.cuda.get_rng_state(index)
    return state


def set_rng_state(state: dict, device: Optional[torch.device] = None) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    index = _cuda_index(device)
    saved = cuda_state_for(state.get("cuda"), index) if index is not None else None
    if saved is not None:
        torch.cuda.set_rng_state(saved, index)


def cuda_state_for(saved: Union[None, torch.Tensor, List[torch.Tensor]], index: int) -> Optional[torch.Tensor]:
    """The saved CUDA RNG state to restore on device `index`. Checkpoints hold one state (the saving
    rank's device). Older ones hold a list, every device of the saving node: its entry `index` where the
    list has one, else None (the device keeps its seeded state), never an IndexError on a node with
    fewer GPUs."""
    if saved is None or torch.is_tensor(saved):
        return saved
    return saved[index] if index < len(saved) else None


def _cuda_index(device: Optional[torch.device]) -> Optional[int]:
    """The CUDA device whose RNG state belongs to this rank, or None (a CPU rank, or no CUDA)."""
    if device is not None:
        return (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
    return torch.cuda.current_device() if torch.cuda.is_available() else None
