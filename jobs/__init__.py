"""Pluggable tasks. A job is a small object: model, data sets, loss, metrics.

`load(cfg)` imports `cfg.target` ("package.module:Class") and builds it with the
job's config, so a user's job lives in their own package, not in this one.
`datasets(job)` builds its data sets once per process: the start-up check of the batch
against the training set and the training itself share them.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Tuple

from torch.utils.data import Dataset

from launcher.jobs.base import Job

__all__ = ["Job", "datasets", "load", "resolve"]
_BUILT: Dict[str, Tuple[Dataset, Dataset]] = {}


def resolve(target: str) -> type:
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"job.target={target!r} is not valid; use 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"job.target={target!r} cannot be imported ({e}); use 'package.module:ClassName'") from None
    return cls


def load(cfg: Any) -> Job:
    return resolve(cfg.target)(cfg)


def datasets(job: Job) -> Tuple[Dataset, Dataset]:
    """`job.datasets()`, built once per process for the same job config (the last one only)."""
    key = repr(job.cfg)
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = job.datasets()
    return _BUILT[key]
