"""Where numbers go: metrics.jsonl, events.jsonl, logs, progress lines.

Only rank 0 of the training group writes run files; every other rank gets the
same object with `enabled=False`, whose methods do nothing, so the training loop
never branches on rank to log.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

from launcher.files import append_jsonl, truncate_jsonl

log = logging.getLogger("launcher")


def setup_logging(run_dir: Optional[Path], rank: int, console: bool = True) -> None:
    """Per-rank file log in logs/rank-<r>.log; only rank 0 (or a lone process) talks on the console."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / f"rank-{rank}.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if console:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh.setLevel(logging.INFO)
        root.addHandler(sh)


class Telemetry:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int = 0):
        self.run_dir, self.enabled, self.total_steps = run_dir, enabled, total_steps
        self.t0 = time.time()

    def truncate_after(self, step: int) -> None:
        """On resume: forget what was logged past the checkpoint, so it is logged once."""
        if self.enabled:
            truncate_jsonl(self.run_dir / "metrics.jsonl", lambda r: r.get("step", 0) <= step)

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.run_dir / "metrics.jsonl", row)
        parts = [f"step {row['step']}/{self.total_steps}", f"epoch {row['epoch']}"]
        for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("samples_per_s", "{:.0f}")):
            if key in row:
                parts.append(f"{key} " + fmt.format(row[key]))
        log.info(" | ".join(parts))

    def event(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        append_jsonl(self.run_dir / "events.jsonl", {"event": kind, "time": time.time(), **fields})
        log.info("event %s %s", kind, fields)

    def validation(self, row: dict) -> None:
        if not self.enabled:
            return
        # One metrics.jsonl line per validation, on its own axis (val/step): results arrive late.
        append_jsonl(self.run_dir / "metrics.jsonl", {"step": row["step"], "val/step": row["step"],
                                                      "val/weights": row["weights"],
                                                      **{f"val/{k}": v for k, v in row["metrics"].items()}})
        metrics = " ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items())
        log.info(f"val step {row['step']} ({row['weights']}): {metrics}")

    def close(self) -> None:
        pass
