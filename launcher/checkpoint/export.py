"""Deployable weights: a safetensors file of a state dict, written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from launcher.files import atomic_write


def save_weights(path: Path, state: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """A deployable safetensors file, written atomically."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = st_save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda f: f.write(data))
