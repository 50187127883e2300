"""Starting the validator process, and keeping it alive on the validator rank.

`spawn` starts `python -m launcher validate` for a run (training rank 0 in validation.mode=process,
the validator rank in mode=rank). `run_validator_rank` is the validator rank's whole life: a child
that it restarts with back-off, outside every training collective.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from launcher.distributed.env import child_environ, shares_gpu_with_validator
from launcher.rundir import RunDir
from launcher.validation import control

log = logging.getLogger(__name__)


SHARED_GPU = "LAUNCHER_SHARED_GPU"  # "1": the validator's GPU also trains (see val_batch_size)


def spawn(rundir: RunDir, device: str, shared: bool = False) -> subprocess.Popen:
    """Start `python -m launcher validate` for this run as a child process; `shared`: on a GPU a trainer
    uses too, so it keeps within validation.gpu_share of it."""
    env = child_environ()
    env["LAUNCHER_PARENT_PID"] = str(os.getpid())
    env[SHARED_GPU] = "1" if shared else "0"
    rundir.logs.mkdir(parents=True, exist_ok=True)
    # With a GPU of its own the validator needs little CPU: a lower priority keeps the data loaders
    # first. Validating on the CPU it must share the cores with training, or it never runs
    # (measured on 2 cores: at nice 10 it validated 1 of 20 snapshots, at nice 0 17 of 20). `nice` execs
    # the interpreter: no preexec_fn, which would run Python in a fork of this multi-threaded process.
    nice = ["nice", "-n", "10"] if device != "cpu" and shutil.which("nice") else []
    with open(rundir.validator_stderr, "ab") as err:
        return subprocess.Popen([*nice, sys.executable, "-m", "launcher", "validate", f"run.dir={rundir}",
                                 f"validation.device={device}"], env=env, stdout=subprocess.DEVNULL, stderr=err)


def child_device(env) -> str:
    """mode=process: the validator's own GPU if the node has one no training rank uses, else the same device
    (then it shares it: distributed.env.shares_gpu_with_validator)."""
    if env.device.type == "cuda" and torch.cuda.device_count() > env.local_world_size:
        return f"cuda:{env.local_world_size}"
    return str(env.device)


MAX_RESTARTS = 3  # the validator rank restarts a dead validator child at most this often
BACKOFF_S = 2.0  # before restart k (from 1): BACKOFF_S * 2**(k-1) seconds


def training_over(rundir: RunDir) -> bool:
    """The trainer stopped waiting for the validator (handoff/done.json `closed`): only now may the validator
    rank join the final collective; before it, the trainers are in none it takes part in."""
    return bool((control.done(rundir) or {}).get("closed"))


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
        child = spawn(rundir, str(env.device), shared=shares_gpu_with_validator(env, torch.cuda.device_count()))
        rc = child.wait()
        if stop or training_over(rundir):
            break
        control.write_status(rundir, state="failed", pid=child.pid, returncode=rc, restarts=restarts)
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
