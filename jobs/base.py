"""The job interface. Subclass it (or just match it) to plug in your own task."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset


class Job:
    """Batches are `(inputs, targets)` tensors with the batch in dimension 0."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Reject this job's bad config before anything starts: raise ValueError naming the fix."""

    def model(self) -> nn.Module:
        raise NotImplementedError

    def datasets(self) -> Tuple[Dataset, Dataset]:
        """(train, val). Built identically on every rank; keep it cheap or cache it."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the micro-batch."""
        return nn.functional.cross_entropy(output, target)

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-batch *sums*; the evaluator divides by the sample count."""
        return {"loss": nn.functional.cross_entropy(output.float(), target, reduction="sum"),
                "acc": (output.argmax(-1) == target).sum().float()}
