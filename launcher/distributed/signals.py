"""Stopping cleanly: a signal sets a flag; all training ranks stop at the same step.

A handler only records the signal (`StopFlag`): no I/O, no collective, since it can run in the
middle of a CUDA call or a collective. The flag is one of the step's agreement (agreement.py): every
optimizer step the training ranks agree on it (MAX of a CPU tensor: gloo even on CUDA, no device
sync), so either every rank stops at this step or none does; a rank that stopped alone would leave
the others waiting in DDP's next all-reduce until the timeout. The loop then writes one checkpoint,
flushes, and the process exits with `128 + signal number` (SIGTERM 143, SIGINT 130, SIGUSR1 138,
`exit_stopped`): the status a shell reports for death by that signal, so schedulers and scripts keep
treating the run as interrupted, while the checkpoint makes the next launch lose no step.

The validator side never takes part in a training collective: the validator rank's
supervisor (validation/supervisor.py) passes a stop signal on to its child and exits with
128 + signal.
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from launcher.config.checks import parse_signals

log = logging.getLogger(__name__)


class StopFlag:
    """Remembers the first stop signal received; `signum` is 0 until then."""

    def __init__(self, names: Iterable[str]):
        self.signum = 0
        self.received_at: Optional[float] = None
        for sig in parse_signals(names):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.signum:
            self.signum, self.received_at = signum, time.time()


@dataclass
class Stop:
    """What the training ranks agreed on at a step boundary."""
    signum: int = 0

    def __bool__(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def log_restart(dist, tel, restart_count: int, step: int) -> None:
    """A `restart` event when torchrun restarted the group. The count is the max over the training
    ranks: with c10d a node restarted only because a peer failed does not count it."""
    count = int(dist.all_reduce(torch.tensor([restart_count]), "max").item())
    if count:
        tel.event("restart", restart_count=count, step=step)


def exit_stopped(tel, flag: StopFlag, stop: Stop, step: int) -> None:
    """After the stop checkpoint: record it, flush, leave with 128 + signal (the run is not finished)."""
    since = time.time() - flag.received_at if flag.received_at else None
    tel.event("preempt", step=step, signal=stop.name, exit_code=stop.exit_code,
              seconds_since_signal=round(since, 3) if since is not None else None)
    log.warning("stopped by %s at step %d after a checkpoint; exit status %d; relaunch to resume",
                stop.name, step, stop.exit_code)
    tel.close()  # flush metrics and wandb
    raise SystemExit(stop.exit_code)
