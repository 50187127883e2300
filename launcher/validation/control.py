"""The hand-off's control files, written atomically, read by stat or a small JSON read:
`stop.json` (the validator asks training to stop), `done.json` (training is over: final step;
`closed` once the trainer stops waiting), `validator.json` (the validator's status and heartbeat).
"""
from __future__ import annotations

import time
from typing import Optional

from launcher.files import read_json, write_json
from launcher.rundir import RunDir

HEARTBEAT_S = 2.0  # the validator refreshes validator.json this often
STALE_S = 30.0  # a heartbeat older than this means the validator is gone


def request_stop(run_dir, step: int, reason: str) -> None:
    """The first request stands: later validations of the backlog do not move it."""
    if not stop_requested(run_dir):
        write_json(RunDir.of(run_dir).stop, {"step": step, "reason": reason, "time": time.time()})


def stop_requested(run_dir) -> bool:
    return RunDir.of(run_dir).stop.exists()


def mark_done(run_dir, final_step: int, closed: bool = False) -> None:
    write_json(RunDir.of(run_dir).done, {"final_step": final_step, "closed": closed})


def done(run_dir, or_summary: bool = False) -> Optional[dict]:
    """The end marker. `or_summary`: a finished run that had no async validator has only summary.json."""
    rundir = RunDir.of(run_dir)
    for path in (rundir.done, rundir.summary) if or_summary else (rundir.done,):
        try:
            return read_json(path)
        except (OSError, ValueError):
            continue
    return None


def reset(run_dir) -> None:
    """A (re)starting trainer: forget the previous session's stop request and end marker."""
    rundir = RunDir.of(run_dir)
    rundir.stop.unlink(missing_ok=True)
    rundir.done.unlink(missing_ok=True)


def write_status(run_dir, **fields) -> None:
    write_json(RunDir.of(run_dir).status, {"time": time.time(), **fields})


def read_status(run_dir) -> Optional[dict]:
    try:
        return read_json(RunDir.of(run_dir).status)
    except (OSError, ValueError):
        return None
