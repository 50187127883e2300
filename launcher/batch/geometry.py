"""Batch geometry: micro-batch x accumulation x training ranks, one immutable description.

The per-rank *step batch* (the samples of one optimizer step on one rank) is fixed
for the run; the micro-batch only decides how it is cut. So autobatch and runtime
OOM recovery change `micro` and nothing else: the effective batch, the LR schedule
and the results stay what the user asked for.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from launcher.config.schema import BatchConfig
from launcher.errors import ConfigError


@dataclass(frozen=True)
class Batch:
    """`step` samples per rank per optimizer step, cut into micro-batches of at most `micro`."""
    micro: int
    step: int
    world: int

    @property
    def accum(self) -> int:
        return -(-self.step // self.micro)

    @property
    def global_size(self) -> int:
        return self.step * self.world

    def halved(self) -> "Batch":
        return dataclasses.replace(self, micro=-(-self.micro // 2))


def geometry(micro: int, global_size: Optional[int], world: int, exact: bool = False) -> Batch:
    """The batch from the largest micro-batch that fits (or the user's `batch.size`).

    Without `batch.global_size` the step batch is one micro-batch. With it, the step batch is
    global_size / world and the micro-batch the most even cut of it that fits; `exact` (a
    user-given batch.size) requires global_size to be a multiple of micro x world instead."""
    if global_size is None:
        return Batch(micro, micro, world)
    if exact:
        per_step = micro * world
        if global_size % per_step:
            raise ConfigError(f"batch.global_size={global_size} is not a multiple of batch.size x "
                              f"training ranks = {micro} x {world}; choose a multiple of {per_step}")
        return Batch(micro, global_size // world, world)
    step = global_size // world
    accum = -(-step // micro)
    return Batch(-(-step // accum), step, world)


def plan(cfg: BatchConfig, world: int, micro: Optional[int] = None) -> Batch:
    """The run's batch from its config, the one rule the CLI's checks and the probe share: `batch.size`
    as given (exact), or with `batch.size=auto` the largest micro-batch that fits (`micro`, probed)."""
    if cfg.size != "auto":
        return geometry(int(cfg.size), cfg.global_size, world, exact=True)
    assert micro is not None, "batch.size=auto: the probe gives the micro-batch"
    return geometry(micro, cfg.global_size, world)


def steps_per_epoch(samples: int, batch: Batch) -> int:
    """Optimizer steps in one pass over a training set of `samples` (each rank drops its remainder); a
    ConfigError when the effective batch does not fit even once."""
    steps = samples // batch.world // batch.step
    if steps == 0:
        raise ConfigError(f"the effective batch {batch.global_size} is larger than the training set "
                          f"({samples} samples); lower batch.size or batch.global_size")
    return steps
