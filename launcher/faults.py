"""Every `debug.*` fault injection, and nowhere else: real exceptions, real exits, real delays.

They exist so that tests and demos exercise the real recovery paths: a forward that
raises a real `torch.OutOfMemoryError` above a micro-batch size (the "simulated
device"), one OOM inside a backward, a hard kill at a step, slow steps and slow
validations.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


def simulated_limit(value: Any, rank: int) -> Optional[int]:
    """debug.simulate_oom_above for this rank: an int for all, or a list indexed by rank."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    values = list(value)
    return int(values[rank % len(values)])


def oom_above(model: nn.Module, limit: Optional[int]):
    """Forward raises a real torch.OutOfMemoryError when the micro-batch is larger than `limit`;
    returns the hook's handle (None without a limit)."""
    if limit is None:
        return None

    def hook(_module, args):
        if args and torch.is_tensor(args[0]) and len(args[0]) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: micro-batch {len(args[0])} > "
                                         f"debug.simulate_oom_above={limit})")
    return model.register_forward_pre_hook(hook)


def fail_at_start(rank: Optional[int], env) -> None:
    """debug.fail_at_start: SIGKILL this global rank before it joins the process group, on the first
    start only (TORCHELASTIC_RESTART_COUNT=0), so `torchrun --max-restarts` restarts a group in which
    one worker never got as far as the store."""
    if rank is not None and rank == env.rank and env.restart_count == 0:
        log.error("debug.fail_at_start=%d: killing this process before it joins the process group", rank)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def validation_delay(debug) -> None:
    """debug.val_delay_s: each validation takes that much longer."""
    if debug.val_delay_s:
        time.sleep(debug.val_delay_s)


class Faults:
    """The training loop's injections."""

    def __init__(self, debug, env, rundir):
        self.debug, self.env, self.state = debug, env, None
        failed_before = any(e.get("event") == "debug_fail" for e in rundir.read_events())
        self.fail_at = None if failed_before else debug.fail_at_step  # once per run, not per restart
        self.oom_at = debug.simulate_oom_at_step

    def arm_forward(self, model: nn.Module) -> None:
        """debug.simulate_oom_above, for the probe and for training alike."""
        oom_above(model, simulated_limit(self.debug.simulate_oom_above, self.env.train_rank))

    def arm_backward(self, model: nn.Module, state) -> None:
        """debug.simulate_oom_at_step: one OOM in backward of that step (state.step + 1), on the last
        training rank."""
        self.state = state
        if self.oom_at is not None:
            model.register_full_backward_pre_hook(self._backward_oom)

    def _backward_oom(self, _module, _grad):
        if self.state.step + 1 == self.oom_at and self.env.train_rank == self.env.train_world - 1:
            at, self.oom_at = self.oom_at, None  # once
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated in backward: debug.simulate_oom_at_step={at})")

    def step_end(self, step: int, tel, dist) -> None:
        """After every optimizer step: debug.step_delay_s, then debug.fail_at_step (every training
        rank dies hard, no cleanup, once per run)."""
        if self.debug.step_delay_s:
            time.sleep(self.debug.step_delay_s)
        if self.fail_at == step:
            tel.event("debug_fail", step=step)
            dist.barrier()  # the event is on disk before any rank dies
            log.error("debug.fail_at_step=%d: exiting hard", step)
            logging.shutdown()
            os._exit(13)
