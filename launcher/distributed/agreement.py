"""The step's one cross-rank decision: what every training rank has to say, agreed once per step.

Components register their flags (`flag(name, read)`): the stop signal, the validator's early stop,
a failed background save; a later one (a non-finite step) is one more line where the Trainer builds
it. Each optimizer step the training ranks agree once, a MAX all-reduce of one small CPU int tensor
over the training group (gloo even on CUDA: no device sync): one slot per rank for its out-of-memory
phase (0: none), then the flags. With OOM recovery on, the step's attempt makes it just before the
last backward, the only one that runs DDP's collectives (`agree(oom=...)`, batch/recovery.py); the
loop's `step_end()` then reads that answer, or agrees itself where the step made none (recovery off)
or must agree afresh (`again`: after an inline validation, which can decide an early stop). So a
step makes one host-side collective, a validation step two, and a flag raised after the step's
agreement is seen at the next one. The time spent in it (mostly waiting for the slowest rank) goes
to `stalls` as `agreement`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from launcher.distributed.signals import Stop


@dataclass(frozen=True)
class Agreed:
    """One step's agreement: `oom` maps each training rank that ran out of memory (or would) to its
    phase (1 + an index into recovery.PHASES); `flags` holds the MAX over the ranks of every flag."""
    oom: Dict[int, int]
    flags: Dict[str, int]

    @property
    def stop(self) -> Stop:
        return Stop(int(self.flags.get("stop", 0)))

    @property
    def early_stop(self) -> bool:
        return bool(self.flags.get("early_stop", 0))

    @property
    def save_failed(self) -> bool:
        return bool(self.flags.get("save_failed", 0))


class Agreement:
    """The step's agreement over the training group (`dist`, a Group; `distributed` False: this rank
    alone, every answer its own). `stalls`: telemetry.stalls.Stalls, or None."""

    def __init__(self, dist, env, stalls=None, distributed: Optional[bool] = None):
        self.dist, self.stalls = dist, stalls
        self.distributed = dist.distributed_training if distributed is None else distributed
        self.world = env.train_world if self.distributed else 1
        self.slot = max(env.train_rank, 0) if self.distributed else 0
        self.reads: Dict[str, Callable[[], int]] = {}
        self._made: Optional[Agreed] = None

    def flag(self, name: str, read: Callable[[], int]) -> None:
        """Register a flag: `read()` is this rank's value at each agreement (0: nothing to say)."""
        self.reads[name] = read

    def agree(self, oom: int = 0) -> Agreed:
        """Agree now (a collective: every training rank calls it at the same point). `oom`: this rank's
        out-of-memory phase (0: none)."""
        t0 = time.perf_counter()
        names: List[str] = list(self.reads)
        values = torch.tensor([0] * self.world + [int(self.reads[n]()) for n in names], dtype=torch.int32)
        values[self.slot] = oom
        if self.distributed:
            self.dist.all_reduce(values, "max")
        oom, flags = values[:self.world].tolist(), values[self.world:].tolist()
        self._made = Agreed({r: v for r, v in enumerate(oom) if v}, dict(zip(names, flags)))
        if self.stalls is not None:
            self.stalls.add("agreement", time.perf_counter() - t0)
        return self._made

    def step_end(self, again: bool = False) -> Agreed:
        """After the optimizer step, on every training rank: this step's agreement (the one its attempt made),
        else one now; `again` (the same on every rank): agree afresh, the flags may have changed since."""
        made, self._made = self._made, None
        if made is None or again:
            made = self.agree()
            self._made = None
        return made
