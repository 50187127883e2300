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
    """`step_samples` samples per rank per optimizer step, cut into micro-batches of at most `micro` (the
    last one smaller where `micro` does not divide it), over `world` training ranks."""
    micro: int
    step_samples: int
    world: int

    @property
    def accum(self) -> int:
        """Micro-batches per step (the last one may be smaller)."""
        return -(-self.step_samples // self.micro)

    @property
    def global_size(self) -> int:
        return self.step_samples * self.world

    def halved(self) -> "Batch":
        return dataclasses.replace(self, micro=-(-self.micro // 2))

    def describe(self) -> str:
        """The cut in words, arithmetically true: `micro-batch 16 x accum 2 x 2 ranks = batch 64`; an uneven cut
        names its last micro-batch: `micro-batches 13 x 7 + 9 = batch 100`."""
        rest = self.step_samples - self.micro * (self.accum - 1)
        if rest == self.micro:
            cut = f"micro-batch {self.micro} x accum {self.accum}"
        else:
            cut = f"micro-batches {self.micro} x {self.accum - 1} + {rest}"
            cut = f"({cut})" if self.world > 1 else cut
        ranks = f" x {self.world} ranks" if self.world > 1 else ""
        return f"{cut}{ranks} = batch {self.global_size}"


def share(global_size: int, world: int) -> int:
    """A rank's samples per optimizer step of `batch.global_size` over `world` training ranks (checks.py
    refuses one that does not divide)."""
    return global_size // world


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
        return Batch(micro, share(global_size, world), world)
    step = share(global_size, world)
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
    steps = samples // batch.world // batch.step_samples
    if steps == 0:
        raise ConfigError(f"the effective batch {batch.global_size} is larger than the training set "
                          f"({samples} samples); lower batch.size or batch.global_size")
    return steps
