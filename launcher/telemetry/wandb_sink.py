"""wandb on training rank 0: offline unless an API key exists, one run id for the whole run.

The id is kept in the run directory and the checkpoint, so a resume continues the
same wandb run. Any wandb failure warns once and turns the sink off: it never stops
training.
"""
from __future__ import annotations

import logging
import netrc
import os
import secrets
from typing import Any, Optional

from launcher.files import atomic_write
from launcher.telemetry.logs import FILE_ONLY

log = logging.getLogger("launcher")


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _start(rundir, wcfg: Any, run_id: str, config: dict):
    """A wandb run, or None (one warning saying why)."""
    mode = str(wcfg.mode)
    if mode == "online" and not _has_api_key():
        log.warning("wandb: no API key (WANDB_API_KEY or ~/.netrc); logging offline instead")
        mode = "offline"
    try:
        import wandb
    except Exception as e:
        log.warning("wandb: cannot import wandb (%s); training goes on without it", e)
        return None, mode
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        try:
            run = wandb.init(mode=attempt, dir=str(rundir), id=run_id, resume="allow", project=wcfg.project,
                             entity=wcfg.entity, name=wcfg.name or rundir.root.name, group=wcfg.group,
                             tags=list(wcfg.tags) or None, config=config,
                             settings=wandb.Settings(console="off", init_timeout=90, silent=True))
            log.info("wandb: %s run %s in %s", attempt, run_id, rundir.wandb,  # offline: the end line says more
                     extra=FILE_ONLY if attempt == "offline" else {})
            run.define_metric("trainer/step")
            for prefix in ("train/*", "gpu/*", "event/*"):
                run.define_metric(prefix, step_metric="trainer/step")
            run.define_metric("val/step")
            run.define_metric("val/*", step_metric="val/step")
            return run, attempt
        except Exception as e:
            log.warning("wandb: init (%s) failed: %s", attempt, e)
    log.warning("wandb: off for this run; metrics.jsonl still has everything")
    return None, mode


class Wandb:
    """One wandb run for the whole training run, started on first use, so that a resume can hand
    over the checkpoint's run id first. Every call is guarded: a failure warns once, then off."""

    def __init__(self, rundir, wcfg: Any, config: dict):
        self.rundir, self.wcfg, self.config = rundir, wcfg, config
        self.fallback_id: Optional[str] = None
        self._id: Optional[str] = None
        self._run, self._mode, self._started, self._dead = None, None, False, False

    def adopt(self, run_id: Optional[str]) -> None:
        """On resume: the checkpoint's id, used when the run directory has none."""
        self.fallback_id = run_id

    def run_id(self) -> str:
        """The run's wandb id: kept in <run_dir>/wandb_id (else the checkpoint's, else a new one)."""
        if self._id is None:
            path = self.rundir.wandb_id
            if path.exists():
                self._id = path.read_text().strip()
            else:
                self._id = self.fallback_id or secrets.token_hex(4)
                atomic_write(path, lambda f: f.write(self._id + "\n"), mode="w")
        return self._id

    def _call(self, fn) -> None:
        if not self._started:
            self._started = True
            self._run, self._mode = _start(self.rundir, self.wcfg, self.run_id(), self.config)
        if self._run is None or self._dead:
            return
        try:
            fn(self._run)
        except Exception as e:
            log.warning("wandb: logging failed (%s); wandb off for the rest of this run", e)
            self._dead = True

    def log(self, row: dict) -> None:
        self._call(lambda run: run.log(row))

    def summary(self, values: dict) -> None:
        self._call(lambda run: run.summary.update(values))

    def finish(self, summary: Optional[dict]) -> None:
        if self._run is None or self._dead:
            return
        if summary:
            self.summary({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        try:
            sync_dir = self._run.settings.sync_dir
            self._run.finish()
            if self._mode == "offline":
                log.info("wandb: offline run saved; upload it with: wandb sync %s", sync_dir)
        except Exception as e:
            log.warning("wandb: finishing the run failed (%s)", e)
        self._run = None
