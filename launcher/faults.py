"""Every `debug.*` fault injection, and nowhere else: real exceptions, real exits, real delays.

They exist so that tests and demos exercise the real recovery paths: a forward that
raises a real `torch.OutOfMemoryError` above a micro-batch size (the "simulated
device"), one OOM inside a backward, a NaN loss on one training rank, an OOM inside
the hand-off, a hard kill at a step, slow steps and slow validations.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable, Optional

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


def handoff_fault(debug):
    """debug.handoff_oom_at_step: the hand-off of that step raises a real torch.OutOfMemoryError inside
    handoff.Writer.put (as a failed pinned or device allocation would); None without it."""
    at = debug.handoff_oom_at_step
    if at is None:
        return None

    fired = []

    def fault(step: int) -> None:
        if step == at and not fired:  # once: the final hand-off at that step is not retried into it
            fired.append(step)
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated in the hand-off: "
                                         f"debug.handoff_oom_at_step={at})")
    return fault


class Faults:
    """The training loop's injections."""

    def __init__(self, debug, env, rundir):
        self.debug, self.env, self.state = debug, env, None
        events = {e.get("event") for e in rundir.read_events()}
        self.fail_at = None if "debug_fail" in events else debug.fail_at_step  # once per run, not per restart
        self.oom_at = None if "oom_restart" in events else debug.simulate_oom_at_step  # the same

    def arm_forward(self, model: nn.Module) -> None:
        """debug.simulate_oom_above, for the probe and for training alike."""
        oom_above(model, simulated_limit(self.debug.simulate_oom_above, self.env.train_rank))

    def arm_oom(self, model: nn.Module, state, phase) -> None:
        """debug.simulate_oom_at_step: one real OOM in step state.step + 1 on training rank
        debug.simulate_oom_rank (-1: the last), where debug.simulate_oom_phase says: `forward` (inside the
        model, after DDP's pre-forward, of the step's first micro-batch), `backward` (at the start of the
        step's first backward: a non-last one when accumulating), `last_backward` (late inside the last
        backward, once DDP has launched its all-reduces: `phase()` is batch.recovery.Recovery's phase) or `headroom`
        (the rank reports too little memory for the last backward; see low_memory)."""
        self.state = state
        if self.oom_at is None or self.debug.simulate_oom_phase == "headroom" or not self._oom_rank():
            return
        kind = self.debug.simulate_oom_phase
        if kind == "forward":
            model.register_forward_pre_hook(lambda m, _a: self._fire("forward") if m.training else None)
        elif kind == "backward":
            model.register_full_backward_pre_hook(lambda _m, _g: self._fire("backward"))
        else:  # the first parameter's gradient comes last in backward, after DDP launched its buckets
            first = next(p for p in model.parameters() if p.requires_grad)
            first.register_hook(lambda g: self._fire("last backward") if phase() == "last backward" else None)

    def low_memory(self, step: int) -> bool:
        """debug.simulate_oom_phase=headroom: at step debug.simulate_oom_at_step (step + 1), once, this rank
        reports that its free memory is below the backward headroom."""
        if self.debug.simulate_oom_phase == "headroom" and step + 1 == self.oom_at and self._oom_rank():
            self.oom_at = None
            log.warning("debug.simulate_oom_phase=headroom: reporting too little memory for the last backward")
            return True
        return False

    def _oom_rank(self) -> bool:
        return self.env.train_rank == self.debug.simulate_oom_rank % self.env.train_world

    def _fire(self, where: str):
        if self.state.step + 1 == self.oom_at:
            at, self.oom_at = self.oom_at, None  # once
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated in {where}: debug.simulate_oom_at_step={at})")

    def arm_nan(self, model: nn.Module, state) -> None:
        """debug.nan_loss_at_step: the model's output, hence the loss, of that step (state.step + 1) is NaN
        on training rank debug.nan_loss_rank (-1: the last) only; the averaged gradients carry it to all."""
        self.state = state
        at, rank = self.debug.nan_loss_at_step, self.debug.nan_loss_rank
        if at is not None and self.env.train_rank == rank % self.env.train_world:
            def hook(module, _args, out):
                if module.training and self.state.step + 1 == at and torch.is_tensor(out):
                    log.warning("debug.nan_loss_at_step=%d: a NaN loss on this rank", at)
                    return out * float("nan")
            model.register_forward_hook(hook)

    def step_end(self, step: int, tel, dist, settle: Callable[[], object] = lambda: None) -> None:
        """After every optimizer step: debug.step_delay_s, then debug.fail_at_step (every training
        rank dies hard, no cleanup, once per run, right after the checkpoints begun so far are on disk:
        `settle` waits for the background save, so the resume point does not depend on the disk's speed)."""
        if self.debug.step_delay_s:
            time.sleep(self.debug.step_delay_s)
        if self.fail_at == step:
            tel.event("debug_fail", step=step)
            settle()
            dist.barrier()  # the event is on disk before any rank dies
            log.error("debug.fail_at_step=%d: exiting hard", step)
            logging.shutdown()
            os._exit(13)
