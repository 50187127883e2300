"""The validator process: claim a snapshot, load it, evaluate it, write the results; repeat.

It talks to the trainer only through the run directory, so either can crash, lag or
run elsewhere. It runs as `python -m launcher validate run.dir=<dir>`: spawned by
training rank 0 (mode=process), by the validator rank (mode=rank), or by hand / Slurm.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import torch

from launcher import jobs
from launcher.checkpoint import store
from launcher.validation import control
from launcher.validation import handoff
from launcher.validation.evaluation import Tracker, fmt, kinds, val_batch_size, validate_state
from launcher.files import Corrupt
from launcher.rundir import RunDir, ValResult
from launcher.config.checks import check_device
from launcher.distributed.env import require_cuda
from launcher.distributed.wrap import backend_flags
from launcher.faults import oom_above, simulated_limit
from launcher.validation.supervisor import SHARED_GPU

log = logging.getLogger(__name__)


def validator_device(spec: str) -> torch.device:
    check_device("validation.device", spec)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    require_cuda("validation.device", spec)
    device = torch.device(spec)
    return torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device  # set_device needs one


class _Heartbeat:
    """validator.json, refreshed from a thread so a long evaluation does not look like a dead validator."""

    def __init__(self, rundir: RunDir):
        self.rundir, self.step, self.state = rundir, None, "running"
        self._stop = threading.Event()
        self._beat()
        threading.Thread(target=self._loop, name="heartbeat", daemon=True).start()

    def _beat(self) -> None:
        control.write_status(self.rundir, state=self.state, pid=os.getpid(), step=self.step)

    def _loop(self) -> None:
        while not self._stop.wait(control.HEARTBEAT_S):
            self._beat()

    def close(self, state: str) -> None:
        self._stop.set()
        self.state = state
        self._beat()


def serve(cfg, rundir: RunDir, device: torch.device, revalidate: bool = False) -> int:
    """Validate hand-off snapshots until training is done and the queue is empty (or, for a
    finished run, every checkpoint). Returns the number of validations."""
    if device.type == "cuda":  # before any CUDA call: the loader's pin-memory thread would make a context on GPU 0
        torch.cuda.set_device(device)
    backend_flags(cfg.train)  # cudnn.benchmark and TF32 as the trainer has them
    job = jobs.load(cfg.job)
    model = job.model().to(device)
    _, val_set = job.datasets()
    shared = os.environ.get(SHARED_GPU) == "1"
    bs = val_batch_size(cfg, model, job, val_set, device, start=4 * job.cfg.batch_size, shared=shared)
    oom_above(model, simulated_limit(cfg.debug.simulate_oom_above, 0))  # debug: every evaluation above it fails
    tracker = Tracker(rundir, cfg)
    rundir.handoff.mkdir(parents=True, exist_ok=True)
    handoff.recover(rundir.handoff)  # picks up where a dead validator stopped
    parent = int(os.environ.get("LAUNCHER_PARENT_PID", 0))
    beat = _Heartbeat(rundir)
    count = 0
    log.info("validator on %s%s: %s, batch %d, policy %s, cudnn.benchmark %s, tf32 %s", device,
             " (shared with a trainer)" if shared else "", rundir, bs, cfg.validation.policy,
             torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)

    def validate(step: int, epoch: int, states: dict, source=None) -> bool:
        """One step's weights, the primary (with best/) last; True when early stopping says stop."""
        nonlocal count, bs
        beat.step, stop = step, False
        for kind, state in sorted(states.items(), key=lambda kv: kv[0] == tracker.primary):
            if not source and (step, kind) in tracker.done:  # validated before a restart lost the ack
                continue
            metrics, secs, rate, bs = validate_state(model, state, job, val_set, cfg, bs, device)
            stop |= tracker.record(ValResult(step, epoch, kind, metrics, round(secs, 4), source=source,
                                             samples_per_s=round(rate, 1), batch_size=bs), state)
            log.info("val step %d (%s): %s [%.2fs, %.0f samples/s]", step, kind, fmt(metrics), secs, rate)
            count += 1
        return stop

    try:
        if revalidate:
            for step in reversed(store.steps(rundir.checkpoints)):
                state = store.load(store.path_for(rundir.checkpoints, step))
                states = store.weights(state)
                validate(step, store.step_epoch(state), {k: states[k] for k in kinds(cfg) if k in states},
                         source="checkpoint")
            beat.close("finished")
            return count
        while True:
            snap = handoff.claim(rundir.handoff, cfg.validation.policy)
            if snap is None:
                end = control.done(rundir, or_summary=not parent)  # a spawned one never sees an old summary
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
            except Corrupt as e:
                log.warning("snapshot %d is corrupt (%s): moved aside as .bad, skipped", snap.step, e)
                snap.reject(str(e))
                continue
            stop = validate(snap.step, manifest.epoch, states)
            snap.ack()
            if stop:
                es = cfg.early_stop
                control.request_stop(rundir, snap.step, f"{cfg.validation.metric}: no improvement > {es.min_delta} "
                                     f"in {es.patience} validations (window {es.window})")
                log.info("early stopping requested at step %d", snap.step)
            if parent and (control.done(rundir) or {}).get("closed"):
                break
    except BaseException:
        log.exception("validator failed")
        beat.close("failed")
        raise
    beat.close("finished")
    return count
