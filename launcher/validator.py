"""The validator process: claim a snapshot, load it, evaluate it, write the results; repeat.

It talks to the trainer only through the run directory, so either can crash, lag or
run elsewhere. It runs as `python -m launcher validate run.dir=<dir>`: spawned by
training rank 0 (mode=process), by the validator rank (mode=rank), or by hand / Slurm.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from launcher import jobs
from launcher import checkpoint, handoff
from launcher.evaluation import Tracker, fmt, kinds, val_batch_size, validate_state
from launcher.rundir import RunDir, ValResult
from launcher.checks import check_device
from launcher.schema import ConfigError
from launcher.validation import spawn

log = logging.getLogger(__name__)


def validator_device(spec: str) -> torch.device:
    check_device("validation.device", spec)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"validation.device={spec} but CUDA is not available here; use cpu or auto")
    return torch.device(spec)


class _Heartbeat:
    """validator.json, refreshed from a thread so a long evaluation does not look like a dead validator."""

    def __init__(self, rundir: RunDir):
        self.rundir, self.step, self.state = rundir, None, "running"
        self._stop = threading.Event()
        self._beat()
        threading.Thread(target=self._loop, name="heartbeat", daemon=True).start()

    def _beat(self) -> None:
        handoff.write_status(self.rundir, state=self.state, pid=os.getpid(), step=self.step)

    def _loop(self) -> None:
        while not self._stop.wait(handoff.HEARTBEAT_S):
            self._beat()

    def close(self, state: str) -> None:
        self._stop.set()
        self.state = state
        self._beat()


def serve(cfg, rundir: RunDir, device: torch.device, revalidate: bool = False) -> int:
    """Validate hand-off snapshots until training is done and the queue is empty (or, for a
    finished run, every checkpoint). Returns the number of validations."""
    job = jobs.load(cfg.job)
    model = job.model().to(device)
    _, val_set = job.datasets()
    bs = val_batch_size(cfg, model, job, val_set, device, start=4 * job.cfg.batch_size)
    tracker = Tracker(rundir, cfg)
    rundir.handoff.mkdir(parents=True, exist_ok=True)
    handoff.recover(rundir.handoff)  # picks up where a dead validator stopped
    parent = int(os.environ.get("LAUNCHER_PARENT_PID", 0))
    beat = _Heartbeat(rundir)
    count = 0
    log.info("validator on %s: %s, batch %d, policy %s", device, rundir, bs, cfg.validation.policy)

    def validate(step: int, epoch: int, states: dict, source=None) -> bool:
        """One step's weights, the primary (with best/) last; True when early stopping says stop."""
        nonlocal count
        beat.step, stop = step, False
        rows = [(kind, state, *validate_state(model, state, job, val_set, cfg, bs, device))
                for kind, state in sorted(states.items(), key=lambda kv: kv[0] == tracker.primary)
                if source or (step, kind) not in tracker.done]  # done: validated before a restart lost the ack
        for kind, state, metrics, secs, rate in rows:
            stop |= tracker.record(ValResult(step, epoch, kind, metrics, round(secs, 4), source=source,
                                             samples_per_s=round(rate, 1)), state)
            log.info("val step %d (%s): %s [%.2fs, %.0f samples/s]", step, kind, fmt(metrics), secs, rate)
            count += 1
        return stop

    try:
        if revalidate:
            for step in reversed(checkpoint.steps(rundir.checkpoints)):
                state = checkpoint.load(checkpoint.path_for(rundir.checkpoints, step))
                states = {"ema": state["ema"]["shadow"] if state.get("ema") else None, "raw": state["model"]}
                validate(step, state["epoch"], {k: states[k] for k in kinds(cfg) if states[k] is not None},
                         source="checkpoint")
            beat.close("finished")
            return count
        while True:
            snap = handoff.claim(rundir.handoff, cfg.validation.policy)
            if snap is None:
                end = handoff.done(rundir, or_summary=not parent)  # a spawned one never sees an old summary
                # `closed`: the trainer stopped waiting for its own validator; a standalone one drains everything.
                if end and ((end.get("closed") and parent) or not handoff.pending(rundir.handoff)):
                    break
                if parent and os.getppid() != parent:
                    log.warning("the process that started this validator is gone; exiting")
                    break
                time.sleep(0.05)
                continue
            try:
                manifest, states = snap.load()
            except handoff.Corrupt as e:
                log.warning("snapshot %d is corrupt (%s): moved aside as .bad, skipped", snap.step, e)
                snap.reject(str(e))
                continue
            stop = validate(snap.step, manifest.epoch, states)
            snap.ack()
            if stop:
                es = cfg.early_stop
                handoff.request_stop(rundir, snap.step, f"{cfg.validation.metric}: no improvement > {es.min_delta} "
                                     f"in {es.patience} validations (window {es.window})")
                log.info("early stopping requested at step %d", snap.step)
            if parent and (handoff.done(rundir) or {}).get("closed"):
                break
    except BaseException:
        log.exception("validator failed")
        beat.close("failed")
        raise
    beat.close("finished")
    return count


MAX_RESTARTS = 3  # the validator rank restarts a dead validator child at most this often
BACKOFF_S = 2.0  # before restart k (from 1): BACKOFF_S * 2**(k-1) seconds


def training_over(rundir: RunDir) -> bool:
    """The trainer stopped waiting for the validator (handoff/done.json `closed`): only now may the validator
    rank join the final collective; before it, the trainers are in none it takes part in."""
    return bool((handoff.done(rundir) or {}).get("closed"))


def run_validator_rank(env, rundir: RunDir) -> None:
    """The validator rank (mode=rank). The work runs in a child process, so a validator that crashes
    or is killed never fails this torchrun worker, and so never takes the training ranks down.

    This rank stays out of every collective until training has finished: a child that exits before
    then is restarted with back-off (at most MAX_RESTARTS times, each one a line in
    handoff/validator-restarts.jsonl and this rank's log), then the rank waits for done.json `closed`.
    Returning early would put it in the final all-reduce on the default group, which the trainers
    join only at the end: after dist.timeout_s the whole job would fail. A stop signal is passed to
    the child and ends this rank with 128 + signal."""
    stop: list = []
    child = None

    def forward(signum, _frame):
        stop.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)

    def wait(seconds: float) -> None:
        end = time.monotonic() + seconds
        while not stop and not training_over(rundir) and time.monotonic() < end:
            time.sleep(0.2)

    restarts = 0
    while not stop:
        child = spawn(rundir, str(env.device))
        rc = child.wait()
        if stop or training_over(rundir):
            break
        handoff.write_status(rundir, state="failed", pid=child.pid, returncode=rc, restarts=restarts)
        if restarts >= MAX_RESTARTS:
            log.warning("the validator exited with status %d after %d restart(s); training goes on without it, "
                        "this rank waits for it to end", rc, restarts)
            wait(float("inf"))
            break
        restarts += 1
        backoff = BACKOFF_S * 2 ** (restarts - 1)
        log.warning("the validator exited with status %d before training ended; restart %d of %d in %.0fs",
                    rc, restarts, MAX_RESTARTS, backoff)
        rundir.restarted_validator(restarts, rc, backoff)
        wait(backoff)
    if stop:
        raise SystemExit(128 + stop[0])
