"""Stopping cleanly: a signal sets a flag; all training ranks stop at the same step.

A handler only records the signal: no I/O, no collective, since it can run in the
middle of a CUDA call or a collective. Every optimizer step the training ranks
all-reduce the flag (MAX of a CPU tensor: gloo even on CUDA, no device sync), so
either every rank stops at this step or none does; a rank that stopped alone would
leave the others waiting in DDP's next all-reduce until the timeout. With OOM
recovery on, the flag rides in the step's OOM agreement (oom.py), so a step makes one
host-side collective, not two; a signal that comes after it is seen one step later.
The same agreement carries a third flag: a checkpoint that failed in the background on some
rank (disk full, read-only directory). Every rank then raises SaveError at that same step.
The loop then writes one checkpoint, flushes, and the process exits with
`128 + signal number` (SIGTERM 143, SIGINT 130, SIGUSR1 138): the status a shell
reports for death by that signal, so schedulers and scripts keep treating the run as
interrupted, while the checkpoint makes the next launch lose no step.

The validator side never takes part in a training collective: the validator rank's
supervisor (validation/supervisor.py) passes a stop signal on to its child and exits with
128 + signal.
"""
from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch

from launcher.config.checks import parse_signals
from launcher.config.schema import RunConfig
from launcher.errors import SaveError

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


class Guard:
    """The step-boundary agreement of the training loop: a stop signal, the validator's early stop and
    a failed background checkpoint.

    `local()` is this rank's [signal, early stop, save failed]; a step's OOM agreement carries it
    (`carried()`), else `step_end()` all-reduces it itself. `save_failed()` returns why this rank's
    background save failed (None while none did). The agreement's time goes to `stalls` (`agreement`):
    it is mostly waiting for the slowest rank."""

    def __init__(self, cfg: RunConfig, dist, tel, early_stop: Callable[[], bool] = lambda: False,
                 save_failed: Callable[[], Optional[str]] = lambda: None, stalls=None):
        self.dist, self.tel, self.early_stop, self.save_failed = dist, tel, early_stop, save_failed
        self.stalls = stalls
        self.flag = StopFlag(cfg.stop_signals)
        self._carried: Optional[List[int]] = None
        self._asked = 0.0

    def local(self) -> List[int]:
        self._asked = time.perf_counter()
        return [self.flag.signum, int(self.early_stop()), int(self.save_failed() is not None)]

    def carried(self, agreed: List[int]) -> None:
        """The MAX over the training ranks of `local()`, agreed in this step's OOM agreement."""
        self._agreed()
        self._carried = agreed

    def _agreed(self) -> None:
        if self.stalls is not None:
            self.stalls.add("agreement", time.perf_counter() - self._asked)

    def log_restart(self, restart_count: int, step: int) -> None:
        """A `restart` event when torchrun restarted the group. The count is the max over the training
        ranks: with c10d a node restarted only because a peer failed does not count it."""
        count = int(self.dist.all_reduce(torch.tensor([restart_count]), "max").item())
        if count:
            self.tel.event("restart", restart_count=count, step=step)

    def step_end(self, again: bool = False) -> Tuple[Stop, bool]:
        """Call on every training rank after every optimizer step; all get the same answer, for a stop
        signal and for the validator's early-stop request: carried by the step's OOM agreement, or one
        all-reduce here. `again` (the same on every rank): the answer may have changed since the
        agreement (an inline validation ran), so agree afresh. Raises SaveError on every rank when a
        background checkpoint failed on any."""
        agreed, self._carried = self._carried, None
        if agreed is None or again:
            agreed = self.dist.all_reduce(torch.tensor(self.local(), dtype=torch.int32), "max").tolist()
            self._agreed()
        signum, early, failed = agreed
        if failed:
            raise SaveError(self.save_failed() or "another training rank could not write its checkpoint (see its "
                            "log); the previous checkpoints are intact")
        return Stop(int(signum)), bool(early)

    def exit(self, stop: Stop, step: int) -> None:
        """After the stop checkpoint: record it, flush, leave with 128 + signal (the run is not finished)."""
        since = time.time() - self.flag.received_at if self.flag.received_at else None
        self.tel.event("preempt", step=step, signal=stop.name, exit_code=stop.exit_code,
                       seconds_since_signal=round(since, 3) if since is not None else None)
        log.warning("stopped by %s at step %d after a checkpoint; exit status %d; relaunch to resume",
                    stop.name, step, stop.exit_code)
        self.tel.close()  # flush metrics and wandb
        raise SystemExit(stop.exit_code)
