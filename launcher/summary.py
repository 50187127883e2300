"""summary.json: the whole run, across every launch that trained it (resumes, restarts, requeues).

The trainer passes in what its launch knows (final step, batch, EMA, the drain; more sections as
components add them) and this module recomputes what spans launches from the run directory:
validated, unvalidated and stale steps from val/results.jsonl, val/skipped.jsonl and the `handoff`
events, the hand-off stall over every snapshot, and the number of launches. The wall time comes
summed from the checkpoints (TrainState). A finished run relaunched without asking for more steps has
nothing to do: `finished()` says so before anything is touched.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from launcher.files import read_jsonl
from launcher.rundir import RunDir

LENGTH = ("train.epochs", "train.max_steps")  # the keys that can ask a finished run for more steps


def whole_run(rundir: RunDir, launch: Dict[str, Any]) -> Dict[str, Any]:
    """`launch` (this launch's summary) with the fields that span launches recomputed from the run directory."""
    events = rundir.read_events()
    out = {**launch, "launches": max(1, sum(e.get("event") == "start" for e in events))}
    handoffs = [e for e in events if e.get("event") == "handoff"]
    if "validated_steps" in launch:  # asynchronous validation: what the validator did with every snapshot
        handed = {e["step"] for e in handoffs}
        validated = {r.step for r in rundir.read_results() if r.source is None}
        stale = {r["step"] for r in read_jsonl(rundir.skipped) if r.get("reason") == "stale"} - validated
        out.update(validated_steps=len(validated), unvalidated_steps=sorted(handed - validated - stale),
                   stale_steps=sorted(handed & stale))
    if handoffs and "handoff_blocked_ms" in launch:
        blocked = [e["blocked_ms"] for e in handoffs]
        out["handoff_blocked_ms"] = {"mean": round(sum(blocked) / len(blocked), 3), "max": round(max(blocked), 3)}
    return out


def finished(rundir: RunDir, changes: Dict[str, Any]) -> Optional[str]:
    """The line for a relaunch of a finished run (it has summary.json) whose `changes` ask for no more steps:
    it has nothing to do and changes nothing. None when there is training left to do."""
    summary = rundir.read_summary()
    if summary is None or any(k in changes for k in LENGTH):
        return None
    how = "stopped early" if summary.get("stopped_early") else "finished"
    return (f"{rundir} is already {how} at step {summary.get('steps')} (summary.json); nothing to do "
            "(raise train.epochs or train.max_steps to train on)")
