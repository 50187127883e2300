"""Where numbers go: metrics.jsonl, events.jsonl, progress, wandb, NVML.

`Telemetry` writes on training rank 0 only; every other rank gets the same object
made of no-op sinks (`OFF`), so the training loop never branches on rank to log.
Validation results reach it from the trainer's side of validation (`validation()`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, List, Optional

from launcher.files import append_jsonl, truncate_jsonl
from launcher.rundir import Best, RunDir, ValResult
from launcher.telemetry.gpu import GpuMonitor, node_cuda_indices
from launcher.telemetry.off import OFF
from launcher.telemetry.progress import make_progress
from launcher.telemetry.wandb_sink import Wandb

from launcher.telemetry.logs import FILE_ONLY
log = logging.getLogger("launcher")


class RunFiles:
    """metrics.jsonl and events.jsonl (each event in the log file too; the console gets the human lines the
    components log themselves: resume, OOM recovery, validator restart, early stop, preemption)."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir

    def metrics(self, row: dict) -> None:
        append_jsonl(self.rundir.metrics, row)

    def event(self, kind: str, fields: dict) -> None:
        self.rundir.event(kind, **fields)
        log.info("event %s %s", kind, fields, extra=FILE_ONLY)

    def truncate_after(self, step: int) -> None:
        """On resume: forget what was logged past the checkpoint, so it is logged once."""
        truncate_jsonl(self.rundir.metrics, lambda r: r.get("step", 0) <= step)


class Telemetry:
    """Where training rank 0's numbers go, one object for all sinks: metrics rows (`metrics`, at the steps
    `should_log` picks), events (`event`: events.jsonl and the log), validation results (`validation`), the
    progress display, NVML samples of the node's GPUs and wandb. Disabled (every other rank) each sink is
    the no-op `OFF`, so callers never branch on rank. `truncate_after` rewinds the files on a resume."""

    def __init__(self, rundir: RunDir, cfg, env, total_steps: int, enabled: bool):
        self.cfg, self.total_steps = cfg, total_steps
        self.step, self.first = 0, None  # (time, step) of the first logged row, for the ETA
        self.last_val: Optional[dict] = None
        self.warned_metric = False
        self.primary = "raw" if cfg.validation.weights == "raw" else "ema"
        self.rundir = rundir
        self.files = RunFiles(rundir) if enabled else OFF
        self.progress = make_progress(cfg.logger.progress, total_steps) if enabled else OFF
        self.gpus = GpuMonitor.start(node_cuda_indices(env, cfg), cfg.logger.telemetry.every_s) if enabled else OFF
        on = enabled and cfg.logger.wandb.mode != "disabled"
        self.wandb = Wandb(rundir, cfg.logger.wandb, dataclasses.asdict(cfg)) if on else OFF

    def should_log(self, step: int, last: bool) -> bool:
        return last or step % self.cfg.train.log_every == 0

    @property
    def wandb_id(self) -> Optional[str]:
        """For the checkpoint: the wandb run id (None when wandb is off)."""
        return self.wandb.run_id()

    def truncate_after(self, step: int, wandb_id: Optional[str] = None) -> None:
        """On resume: forget what was logged past the checkpoint; adopt the checkpoint's wandb id."""
        self.wandb.adopt(wandb_id)
        self.files.truncate_after(step)

    def metrics(self, row: dict) -> None:
        gpus = self.gpus.take()
        if gpus:
            row = {**row, "gpu": gpus}
        self.files.metrics(row)
        self.step = row["step"]
        now = time.time()
        if self.first is None:
            self.first = (now, row["step"])
        eta = None
        if row["step"] > self.first[1]:
            eta = (now - self.first[0]) / (row["step"] - self.first[1]) * (self.total_steps - row["step"])
        self.progress.update(row, eta, self.last_val)
        flat = {f"train/{k}": v for k, v in row.items() if k not in ("step", "time", "gpu")}
        for g in gpus or []:
            flat.update({f"gpu/{g['index']}/{k}": v for k, v in g.items() if k not in ("index", "uuid")})
        self.wandb.log({"trainer/step": row["step"], **flat})

    def validation(self, rows: List[ValResult], best: Optional[Best] = None) -> None:
        """Validation results, inline or from the validator: log lines, progress, and one wandb row per
        step (raw and EMA side by side); `best`, the validation's best so far, goes to wandb's summary."""
        metric, by_step = self.cfg.validation.metric, {}
        for row in rows:
            log.info(f"val step={row.step} weights={row.weights} " +  # the console has them in the progress
                     " ".join(f"{k}={v:.4f}" for k, v in row.metrics.items()), extra=FILE_ONLY)
            if metric in row.metrics and row.weights == self.primary:
                self.last_val = {"metric": f"{row.weights}_{metric}", "value": row.metrics[metric], "step": row.step}
            elif row.weights == self.primary and not self.warned_metric:
                self.warned_metric = True  # said once, on the console: best/ and early stopping stay empty
                log.warning("validation.metric=%r is not among the job's metrics (%s): no best/ and no early "
                            "stopping for this run", metric, ", ".join(sorted(row.metrics)))
            by_step.setdefault(row.step, {}).update({f"val/{row.weights}/{k}": v for k, v in row.metrics.items()})
        for step, values in by_step.items():
            self.wandb.log({"val/step": step, **values})
        if rows and best:
            self.wandb.summary({f"best/{best.metric}": best.value, "best/step": best.step,
                                "best/weights": best.weights})

    def event(self, kind: str, **fields: Any) -> None:
        self.files.event(kind, fields)
        numbers: Dict[str, Any] = {f"event/{kind}/{k}": v for k, v in fields.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if kind in ("start", "resume", "end") or "oom" in kind or "autobatch" in kind:
            self.wandb.log({"trainer/step": self.step, **numbers})

    def close(self) -> None:
        self.gpus.close()
        self.progress.close()
        self.wandb.finish(self.rundir.read_summary())
