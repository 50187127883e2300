"""The job interface. Subclass it (or just match it) to plug in your own task.

A job's config is a dataclass deriving from `JobConfig`, kept beside the job; the
launcher's schema registers the shipped ones with Hydra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset

MISSING = "???"  # omegaconf.MISSING (a required field), spelled out: jobs import nothing from Hydra


class Choice(str, Enum):
    """A config choice: the schema rejects any other value; compares equal to its name."""

    def __str__(self) -> str:
        return self.value


@dataclass
class JobConfig:
    """Which task to train. `target` is `module:Class`; any importable path works."""
    name: str = MISSING  # the job's name (set by the group: job=<name>)
    target: str = MISSING  # `package.module:Class` of the job; any importable path
    batch_size: int = 64  # default micro-batch: batch.size=auto on CPU; the batch probes start from it


@dataclass
class CustomJob(JobConfig):
    """A user's own job: `job=custom job.target=my_pkg.my_job:MyJob +job.params.k=v`."""
    name: str = "custom"
    params: Dict[str, Any] = field(default_factory=dict)  # free-form, for your job: +job.params.<name>=<value>


class Job:
    """Batches are `(inputs, targets)` tensors with the batch in dimension 0.

    `metric_names`: the keys `metrics()` returns, so a `validation.metric` the job does not have is
    refused before training; None (a job that overrides `metrics()` without saying) defers to the
    first validation.

    `shard_blocks`: with train.strategy=fsdp, the class names of the modules that each get their own
    FSDP shard unit (e.g. `("TransformerBlock",)`); empty: the automatic rule of launcher/distributed/fsdp.py."""
    metric_names: Optional[Tuple[str, ...]] = None
    shard_blocks: Tuple[str, ...] = ()

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
        """Per-batch *sums*; the evaluator divides by the sample count (these: `loss`, `acc`)."""
        return {"loss": nn.functional.cross_entropy(output.float(), target, reduction="sum"),
                "acc": (output.argmax(-1) == target).sum().float()}


def declared_metrics(cls: type) -> Optional[Tuple[str, ...]]:
    """The metric names a job class declares, or those of Job.metrics when it keeps them; None: unknown."""
    names = getattr(cls, "metric_names", None)
    if names is None and getattr(cls, "metrics", None) is Job.metrics:
        names = ("loss", "acc")
    return tuple(names) if names is not None else None
