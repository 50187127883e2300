"""`train`'s start-up, before the first step: the promise that bad input creates nothing.

`precheck` rejects everything it can without a process group (the config's rules, the job, the
devices, where the run goes, the batch against the training set). `agree_run_dir` has rank 0 create
the run directory (or find a finished run with nothing to do) and tells every rank. Start-up cut short
after that (bad input only training can find, Ctrl-C) removes a run directory this launch created
and that holds no checkpoint yet, as if the run never started.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

from launcher.config import checks, schema
from launcher.config.schema import Config
from launcher.errors import ConfigError, NothingToDo
from launcher.rundir import RunDir


def precheck(cfg: Config, world_size: int, train_world: int, data: bool = True) -> None:
    """Everything that can be rejected without a process group. `data`: also build the job's data sets (once
    per process; training reuses them) to check the batch against the training set."""
    from launcher import jobs
    from launcher.batch.geometry import plan, steps_per_epoch
    from launcher.distributed import fsdp
    from launcher.distributed.env import require_cuda
    from launcher.jobs.base import declared_metrics

    checks.check(cfg, world_size)
    try:
        target = jobs.resolve(cfg.job.target)
        getattr(target, "check", lambda _: None)(cfg.job)  # the job's own checks (data dir, extras)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    missing = [m for m in ("model", "datasets") if getattr(target, m, None) in (None, getattr(jobs.Job, m))]
    if missing:
        lacks = " and ".join(f"{m}()" for m in missing)
        raise ConfigError(f"job.target={cfg.job.target}: the job does not define {lacks}; "
                          "a job subclasses launcher.jobs.base.Job and defines model() and datasets()")
    names = declared_metrics(target)
    if names is not None and cfg.validation.metric not in names:
        raise ConfigError(f"validation.metric={cfg.validation.metric!r} is not a metric of job.target={cfg.job.target}; "
                          f"choose one of {', '.join(names)}")
    for key in ("train.device", "validation.device"):
        require_cuda(key, schema.get(cfg, key))
    if cfg.train.strategy == "fsdp" and (missing := fsdp.api_missing()):
        import torch

        raise ConfigError(f"train.strategy=fsdp needs torch>=2.6 (FSDP2); this torch {torch.__version__} lacks "
                          f"{', '.join(missing)}; upgrade torch, or use train.strategy=ddp")
    check_writable(Path(cfg.run.dir or cfg.run.root), "run.dir" if cfg.run.dir else "run.root")
    if cfg.batch.size != "auto":
        batch = plan(cfg.batch, train_world)
        if data:  # batch.size=auto: the probe decides the batch, and training checks it
            steps_per_epoch(len(jobs.datasets(jobs.load(cfg.job))[0]), batch)


def check_writable(path: Path, key: str) -> None:
    """The nearest existing folder of `path` must be a writable directory."""
    parent = path.resolve()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: cannot create it, {parent} is not a writable directory; "
                          f"choose a writable place with {key}=<dir>")


def make_run_dir(cfg: Config, config_text: str, overrides: List[str]) -> Tuple[RunDir, bool]:
    """Rank 0: (the run directory, whether this call created it); run.resume=must is checked first, and a
    finished run with nothing to do raises NothingToDo before anything is written."""
    from launcher import summary
    from launcher.checkpoint import store
    from launcher.config import history
    from launcher.distributed.env import run_id
    from launcher.files import atomic_write
    from launcher.validation import control

    rundir = RunDir(Path(cfg.run.dir or Path(cfg.run.root) / run_id(cfg.run.id)).resolve())
    if cfg.run.resume == "must" and store.load_latest(rundir.checkpoints)[0] is None:
        raise ConfigError(f"run.resume=must but {rundir.checkpoints} holds no loadable checkpoint; "
                          "use run.resume=auto to start fresh, or point run.dir at an existing run")
    existed, changes, breaking = rundir.root.exists(), {}, []
    resuming = cfg.run.resume != "never" and rundir.config.exists() and bool(store.steps(rundir.checkpoints))
    try:  # resuming: config.yaml stays the first launch's; changes are recorded, or refused (history.py)
        changes, breaking = history.check(rundir, config_text, cfg.run.allow_changes) if resuming else ({}, [])
    except ConfigError:
        if store.load_latest(rundir.checkpoints)[0] is not None:
            raise
        resuming = False  # no checkpoint loads: a fresh start with this config
    if resuming and (line := summary.finished(rundir, changes)):
        raise NothingToDo(line)
    try:
        rundir.make()
        control.reset(rundir)  # before any validator can see a previous session's stop/done markers
        header = "# launcher train " + " ".join(overrides) + "\n"
        if not resuming:
            atomic_write(rundir.config, lambda f: f.write(header + config_text), mode="w")
        elif changes:
            history.record(rundir, changes, breaking, overrides)
    except OSError as e:
        raise ConfigError(f"run.dir={rundir}: cannot write there ({e.strerror or e}); "
                          "choose a writable place with run.dir=<dir>") from None
    return rundir, not existed


def agree_run_dir(cfg: Config, dist, config_text: str, overrides: List[str]) -> Tuple[RunDir, bool]:
    """Rank 0 chooses (run.dir, else runs/<id>), creates it and writes config.yaml; all ranks receive it (or
    rank 0's ConfigError or NothingToDo, so every rank exits alike). Also: whether this launch created it."""
    answer = None
    if dist.env.rank == 0:
        try:
            rundir, created = make_run_dir(cfg, config_text, overrides)
            answer = ("ok", str(rundir), created)
        except ConfigError as e:
            answer = ("error", str(e), False)
        except NothingToDo as e:
            answer = ("finished", str(e), False)
    kind, value, created = dist.broadcast_object(answer)
    if kind != "ok":
        raise (ConfigError if kind == "error" else NothingToDo)(value)
    return RunDir(value), created


def remove_unstarted_run(rundir: Optional[RunDir], created: bool) -> str:
    """Start-up cut short: remove a run directory this launch created and that holds no checkpoint yet (rank 0
    passes it, the others None). The note for the line that says why, or ""."""
    from launcher.checkpoint import store

    if rundir is None or not created or not rundir.root.exists() or store.steps(rundir.checkpoints):
        return ""
    logging.shutdown()
    shutil.rmtree(rundir.root, ignore_errors=True)
    return f"; removed {rundir}, which held no checkpoint yet"
