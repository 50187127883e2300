"""Where the training thread's time went: seconds blocked, by cause, against the run's wall time.

A stall is time the training thread spends on something other than training steps: taking a
checkpoint's snapshot (and waiting for the previous save), handing weights to the validator, the
step's agreement between ranks (distributed/agreement.py: made before the last backward with OOM
recovery on, else at the step's end; mostly waiting for the slowest rank), logging (the loss
all-reduce, metrics.jsonl, wandb) and inline validation.
Each site wraps its work in `measure(cause)`. Measures nest exclusively: an inner measure's time
counts for its own cause only (a `checkpoint` measure inside another counts as `checkpoint`), so the
totals add up to the time actually blocked.

Work moved off the training thread (a checkpoint's serialization, checksums and writing; a
hand-off's file) is recorded beside it with `background(cause, seconds)`, from any thread: the
summary then says what the training thread was spared.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List

CAUSES = ("checkpoint", "handoff", "agreement", "logging", "inline_validation")


@dataclass
class Cause:
    """One cause's total: seconds, how many stalls, the longest."""
    seconds: float = 0.0
    count: int = 0
    max_s: float = 0.0


class Stalls:
    """The training thread's stall accumulator (one per process). `measure`/`add` belong to the
    training thread; `background` may be called from any thread."""

    def __init__(self) -> None:
        self.causes: Dict[str, Cause] = {}
        self.off_thread: Dict[str, Cause] = {}
        self._open: List[list] = []  # [cause, start, seconds of nested measures]
        self._lock = threading.Lock()

    @contextmanager
    def measure(self, cause: str) -> Iterator[None]:
        """Time the block as `cause` (within a measure of the same cause: part of that one)."""
        if self._open and self._open[-1][0] == cause:
            yield
            return
        frame = [cause, time.perf_counter(), 0.0]
        self._open.append(frame)
        try:
            yield
        finally:
            self._open.pop()
            spent = time.perf_counter() - frame[1]
            self.add(cause, spent - frame[2])
            if self._open:
                self._open[-1][2] += spent

    def add(self, cause: str, seconds: float) -> None:
        _count(self.causes, cause, seconds)

    def background(self, cause: str, seconds: float) -> None:
        with self._lock:
            _count(self.off_thread, cause, seconds)

    def summary(self, wall_s: float) -> dict:
        """summary.json's `stall_by_cause`: per cause seconds, count, longest (ms) and share of the wall time."""
        total = sum(c.seconds for c in self.causes.values())
        with self._lock:
            background = _table(self.off_thread, wall_s)
        return {"wall_s": round(wall_s, 3), "stalled_s": round(total, 3),
                "fraction": round(total / wall_s, 4) if wall_s > 0 else None,
                "causes": _table(self.causes, wall_s), "background": background}


def _count(table: Dict[str, Cause], cause: str, seconds: float) -> None:
    c = table.setdefault(cause, Cause())
    c.seconds += seconds
    c.count += 1
    c.max_s = max(c.max_s, seconds)


def _table(table: Dict[str, Cause], wall_s: float) -> dict:
    return {name: {"s": round(c.seconds, 3), "count": c.count, "max_ms": round(c.max_s * 1e3, 1),
                   "fraction": round(c.seconds / wall_s, 4) if wall_s > 0 else None}
            for name, c in sorted(table.items(), key=lambda kv: -kv[1].seconds)}


def describe(stall: dict) -> str:
    """One sentence for report.md from summary.json's `stall_by_cause`."""
    causes = ", ".join(f"{name.replace('_', ' ')} {c['s']:.2f} s ({c['count']}x, longest {c['max_ms']:.0f} ms)"
                       for name, c in stall["causes"].items()) or "nothing"
    moved = ", ".join(f"{name} {c['s']:.2f} s" for name, c in stall.get("background", {}).items())
    share = f" ({100 * stall['fraction']:.1f}%)" if stall.get("fraction") is not None else ""
    return (f"The training thread was blocked {stall['stalled_s']:.2f} s of {stall['wall_s']:.2f} s{share}: {causes}."
            + (f" Done off the training thread: {moved}." if moved else ""))

