"""Pluggable tasks. A job is a small object: model, data sets, loss, metrics.

`load(cfg)` imports `cfg.target` ("package.module:Class") and builds it with the
job's config, so a user's job lives in their own package, not in this one.
"""
from __future__ import annotations

import importlib
from typing import Any

from launcher.jobs.base import Job

__all__ = ["Job", "load", "resolve"]


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
