"""The trainer's side of validation: off, inline (the blocking baseline) or asynchronous.

One object from `for_training()` on every training rank, the same interface (`Validation`) for all:
`due` (the one validation cadence: every training rank checkpoints at validation steps),
`submit(step, epoch, snapshot)` (the checkpoint's snapshot of the step: a hand-off sends its
weights), `poll` (at logging steps: new results, skipped snapshots, a dead validator),
`stop_requested`, `protected_steps` (a pure read of what the last poll saw), `flush`, `finish`.
Asynchronous validation hands snapshots to a validator elsewhere (a child process it spawns, the
validator rank, or `launcher validate` started by hand) and reads its results from the run
directory without blocking; it never imports the validator. The best step is the validator's
decision (evaluation.Tracker, best/best.json), read here once per poll that brings results. Under
train.strategy=fsdp every training rank hands off its own shards (`ShardHandoff` on ranks but 0);
rank 0 alone reads results and early stop, and spawns the validator.
"""
from __future__ import annotations

import copy
import logging
import subprocess
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from launcher.checkpoint.staging import Snapshot
from launcher.distributed.env import shares_gpu_with_validator
from launcher.errors import ConfigError
from launcher.faults import handoff_fault
from launcher.files import JsonlTail
from launcher.rundir import Best, RunDir, ValResult
from launcher.telemetry.stalls import Stalls
from launcher.validation import control, handoff
from launcher.validation.evaluation import Tracker, best_summary, kinds, val_batch_size, validate_state
from launcher.validation.supervisor import child_device, spawn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cadence:
    """Which steps validate: `validation.every_steps`, else every `validation.every_epochs` epochs, and the
    last step; none with validation off."""
    on: bool = False
    every_steps: int = 0
    every_epochs: int = 1


class Validation:
    """The interface every training rank's validation has, doing nothing: `due` still answers, so that
    every training rank checkpoints at the validation steps (the best step always has a full checkpoint
    for retention to keep)."""
    stall = "handoff"  # what the training thread's time in submit() is, for telemetry.stalls

    def __init__(self, cadence: Cadence = Cadence()):
        self.cadence = cadence

    def due(self, step: int, epoch: int, end_of_epoch: bool, last: bool) -> bool:
        """Whether `step` is a validation step: the same answer on every training rank."""
        c = self.cadence
        if not c.on:
            return False
        return last or (step % c.every_steps == 0 if c.every_steps else end_of_epoch and (epoch + 1) % c.every_epochs == 0)

    def submit(self, step: int, epoch: int, snapshot: Snapshot) -> None:
        """Validate (or hand off) step `step`; `snapshot` is the checkpoint's snapshot of it."""

    def poll(self) -> None:
        """A look at what the validator did since the last poll (the loop polls at its logging steps)."""

    def stop_requested(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def protected_steps(self) -> List[int]:
        """Checkpoints that retention must keep, as of the last poll (reads nothing)."""
        return []

    def finish(self, step: int, epoch: int, snapshot: Snapshot) -> dict:
        """At the end: the final step (`snapshot`: its snapshot) validated; this rank's summary fields."""
        return {}


class NoValidation(Validation):
    """Nothing to validate here: validation.mode=off, or a training rank that hands nothing off."""


class _Validation(Validation):
    def __init__(self, cfg, rundir: RunDir, tel):
        super().__init__(cadence(cfg))
        self.cfg, self.rundir, self.tel = cfg, rundir, tel
        self.kinds = kinds(cfg)


class InlineValidation(_Validation):
    """The classic, blocking way (kept as a baseline): evaluate inside the training loop."""
    stall = "inline_validation"

    def __init__(self, cfg, rundir: RunDir, job, val_set, model, ema, micro: int, device, tel):
        super().__init__(cfg, rundir, tel)
        self.job, self.val_set, self.model, self.ema, self.device = job, val_set, model, ema, device
        self.tracker = Tracker(rundir, cfg)
        self.eval_model = copy.deepcopy(model)
        self.bs = val_batch_size(cfg, self.eval_model, job, val_set, device, start=4 * micro)
        self.stop, self.last = False, None

    def submit(self, step: int, epoch: int, snapshot: Snapshot) -> None:
        """The live weights, evaluated here. Under its own RNG state: the evaluation loader draws from the
        global generator, and the step's snapshot (taken before) holds the RNG the training goes on with."""
        rows = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for kind in self.kinds:
                state = self.ema.shadow if kind == "ema" else self.model.state_dict()
                metrics, secs, rate, self.bs = validate_state(self.eval_model, state, self.job, self.val_set, self.cfg,
                                                              self.bs, self.device)
                rows.append(ValResult(step, epoch, kind, metrics, round(secs, 4), samples_per_s=round(rate, 1),
                                      batch_size=self.bs))
                self.stop |= self.tracker.record(rows[-1], state)
        self.tel.validation(rows, self.tracker.best)
        self.last = step

    def stop_requested(self) -> bool:
        return self.stop

    def protected_steps(self) -> List[int]:
        return [self.tracker.best.step] if self.tracker.best else []

    def finish(self, step: int, epoch: int, snapshot: Snapshot) -> dict:
        if self.last != step:
            self.submit(step, epoch, snapshot)
        return best_summary(self.tracker.best)


class _Handoff(_Validation):
    """A hand-off Writer: rank 0's weights (ddp) or this rank's shards (fsdp: `world` training ranks), sent
    from the checkpoint's snapshot of the step (every validation step checkpoints): one copy for both.
    `stalls`: the writer's time goes there, beside the training thread's (`handoff`, background)."""

    def __init__(self, cfg, rundir: RunDir, tel, stalls: Stalls, rank: int = 0, world: Optional[int] = None):
        super().__init__(cfg, rundir, tel)
        self.stalls = stalls
        self.writer = handoff.Writer(rundir, cfg.validation.policy, cfg.validation.queue,
                                     fault=handoff_fault(cfg.debug), rank=rank, world=world, on_written=self._written)

    def submit(self, step: int, epoch: int, snapshot: Snapshot) -> None:
        """The training thread's stall per validation is put()'s duration (the snapshot's own counts as the
        checkpoint's): event `handoff` with blocked_ms, and write_s once written (the writer thread)."""
        self.writer.put(step, epoch, snapshot, {kind: snapshot.weights[kind] for kind in self.kinds})

    def _written(self, step: int, blocked_s: float, write_s: float) -> None:
        """The writer thread, a snapshot on disk (a file append: safe from that thread)."""
        self.tel.event("handoff", step=step, blocked_ms=round(blocked_s * 1e3, 3), write_s=round(write_s, 3))
        self.stalls.background("handoff", write_s)

    def flush(self) -> None:
        self.writer.flush()

    def stall_ms(self) -> dict:
        blocked = [b * 1e3 for b in self.writer.blocked_s] or [0.0]
        return {"mean": round(sum(blocked) / len(blocked), 3), "max": round(max(blocked), 3)}


class ShardHandoff(_Handoff):
    """fsdp, every training rank but 0: hand off this rank's shards at each validation step (the snapshot
    is complete once every rank's piece is); rank 0 reads the results and decides early stop."""

    def finish(self, step: int, epoch: int, snapshot: Snapshot) -> dict:
        if not self.writer.submitted or self.writer.submitted[-1] != step:
            self.submit(step, epoch, snapshot)
        self.writer.flush()
        log.info("hand-off stall on rank %d over %d snapshot(s): %s ms", self.writer.rank, len(self.writer.blocked_s),
                 self.stall_ms())
        return {}


class AsyncValidation(_Handoff):
    """Hand snapshots to a validator elsewhere; read its results without blocking; drain at the end."""

    def __init__(self, cfg, rundir: RunDir, tel, stalls: Stalls, child: Optional[subprocess.Popen],
                 world: Optional[int] = None):
        super().__init__(cfg, rundir, tel, stalls, rank=0, world=world)
        self.child = child
        self.best: Optional[Best] = rundir.read_best()  # the validator's decision, as of the last poll
        self.results = JsonlTail(rundir.results, from_end=True)
        self.skips = JsonlTail(rundir.skipped, from_end=True)
        self.restarts = JsonlTail(rundir.validator_restarts, from_end=True)
        self.validated, self.skipped = set(), {}
        self.started, self.warned = time.time(), False
        self._stop, self._checked = False, 0.0

    def alive(self) -> bool:
        """The validator is still at work (it may finish: see `down`)."""
        if self.child is not None:
            return self.child.poll() is None
        status = control.read_status(self.rundir)
        if status is None or status["time"] < self.started:
            return True  # not started yet (or a previous session's): give it the benefit of the doubt
        return status["state"] == "running" and time.time() - status["time"] < control.STALE_S

    def down(self) -> bool:
        """Gone before its work was done: exited with an error, failed, or silent. One that finished is not."""
        if self.alive():
            return False
        if self.child is not None:
            return self.child.poll() != 0
        return (control.read_status(self.rundir) or {}).get("state") != "finished"

    def poll(self) -> None:
        """A cheap look at what the validator did since the last call (one read per file; best/best.json
        only when there are new results)."""
        rows = [ValResult.from_dict(row) for row in self.results.read()]
        self.validated.update(r.step for r in rows)
        if rows:
            self.best = self.rundir.read_best()
        self.tel.validation(rows, self.best)
        for row in self.skips.read():
            self.skipped[row["step"]] = row["reason"]
            self.tel.event("validation_skipped", step=row["step"], reason=row["reason"], detail=row.get("detail"))
        for row in self.restarts.read():  # written by the validator rank; events.jsonl only by this rank
            self.warned = False
            log.warning("the validator rank restarted its validator (restart %d, it exited with %s)",
                        row["restart"], row["returncode"])
            self.tel.event("validator_restart", restart=row["restart"], returncode=row["returncode"],
                           backoff_s=row["backoff_s"])
        if not self.warned and self.down():
            self.warned = True
            log.warning("the validator is gone; training goes on, later snapshots stay unvalidated in %s "
                        "(`python -m launcher validate run.dir=%s` picks them up)", self.rundir.handoff,
                        self.rundir)
            self.tel.event("validator_down", returncode=self.child.poll() if self.child else None)

    def stop_requested(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= 0.2:  # at most a few stat() calls a second, whatever the step rate
            self._checked, self._stop = now, control.stop_requested(self.rundir)
        return self._stop

    def protected_steps(self) -> List[int]:
        """The best so far, and every step not validated yet: it may still become the best. As the last poll
        saw them: a step validated since is still protected (kept a little longer, never dropped early)."""
        waiting = [s for s in self.writer.submitted if s not in self.validated and s not in self.skipped]
        return ([self.best.step] if self.best else []) + waiting

    def finish(self, step: int, epoch: int, snapshot: Snapshot) -> dict:
        """Drain: the final weights are handed off and, within drain_timeout_s, validated."""
        t0 = time.perf_counter()
        if not self.writer.submitted or self.writer.submitted[-1] != step:
            self.submit(step, epoch, snapshot)
        self.writer.flush()
        control.mark_done(self.rundir, step)
        deadline = time.monotonic() + self.cfg.validation.drain_timeout_s
        while not handoff.settled(self.rundir.handoff, step) and self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        control.mark_done(self.rundir, step, closed=True)
        if self.child is not None:
            try:
                self.child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.child.terminate()
                self.child.wait()
        self.poll()  # the last results
        return {**best_summary(self.best),
                "validated_steps": len(self.validated & set(self.writer.submitted)),
                "unvalidated_steps": [s for s in self.writer.submitted
                                      if s not in self.validated and self.skipped.get(s) != "stale"],
                "stale_steps": [s for s in self.writer.submitted if self.skipped.get(s) == "stale"],
                "handoff_blocked_ms": self.stall_ms(),
                "drain_s": round(time.perf_counter() - t0, 2)}


def cadence(cfg) -> Cadence:
    v = cfg.validation
    return Cadence(v.mode != "off", v.every_steps, v.every_epochs)


def for_training(cfg, env, rundir: RunDir, job, val_set, model, ema, micro: int, tel, stalls: Stalls,
                 sharded: bool = False) -> Validation:
    """This training rank's validation: rank 0's, and with a `sharded` model (fsdp) and an asynchronous
    mode every rank's hand-off of its own shards. The mode is the launch's (`env.validation_mode`)."""
    mode = env.validation_mode
    if mode == "inline" and cfg.train.strategy == "fsdp" and env.train_world >= 2:  # checks.py says so first
        raise ConfigError("validation.mode=inline is not supported with train.strategy=fsdp on 2+ processes "
                          "(rank 0 alone would evaluate a sharded model); use validation.mode=auto, process or off")
    if mode == "off" or env.train_rank < 0 or not (env.is_main or sharded) or (mode == "inline" and not env.is_main):
        return NoValidation(cadence(cfg))
    if mode == "inline":
        return InlineValidation(cfg, rundir, job, val_set, model, ema, micro, env.device, tel)
    world = env.train_world if sharded else None
    if not env.is_main:
        return ShardHandoff(cfg, rundir, tel, stalls, rank=env.train_rank, world=world)
    child = spawn(rundir, child_device(env), shares_gpu_with_validator(env, torch.cuda.device_count())) \
        if mode == "process" else None  # rank/external: started elsewhere
    return AsyncValidation(cfg, rundir, tel, stalls, child, world=world)
