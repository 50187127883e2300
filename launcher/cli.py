"""Command line: compose the Hydra config, check it, agree on the run directory, pick a role.

The normal path uses Hydra's Compose API, so no rank creates Hydra output
directories or changes the working directory, and a bad override becomes one
line and exit status 2 before any process group exists. Hydra's own flags
(--cfg, --help, --info, ...) are handed to `hydra.main` and behave as usual.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import OmegaConf, open_dict

from launcher.config import checks, schema
from launcher.config.compose import CONF_DIR, HYDRA_FLAGS, compose_config, hydra_context, hydra_keys, hydra_main, \
    one_line, split_config_dir
from launcher.rundir import RunDir
from launcher.config.schema import Config
from launcher.errors import ConfigError
USAGE = """usage: python -m launcher {train,validate,report} [args]

  train [overrides]           train (torchrun --nproc_per_node=N -m launcher train for DDP)
  train -m key=a,b [...]      a sweep: one run per point, <sweep dir>/<n> (README "Sweeps")
  validate <dir>              standalone validator for a live or finished run (or run.dir=<dir>)
  report <dir>                plots and a summary of a run (or run.dir=<dir>)
  sweep <dir>                 the summary of a sweep (sweep.md, sweep.json)

Overrides are Hydra's: key=value, group=option (job=synthetic, optim=sgd).
`python -m launcher train --help` lists every key; `--cfg job` prints the config."""

log = logging.getLogger("launcher")


def fail(message: str) -> int:
    print(f"launcher: error: {message}", file=sys.stderr)
    return 2


def load_config(overrides: List[str]) -> Tuple[Config, str]:
    """Compose, type-check and convert the config; Hydra's own flags run hydra.main and exit."""
    schema.register()
    for a in overrides:
        if a.startswith("+") and not a.lstrip("+").startswith("job.params."):
            raise ConfigError(f"{a!r}: adding keys is not allowed (the schema is fixed); drop the '+' to set "
                              "an existing key, or use +job.params.<name>=... for a custom job")
    config_dir, overrides = split_config_dir(overrides)
    if any(a.split("=")[0] in HYDRA_FLAGS for a in overrides):
        hydra_main(overrides, config_dir)
        raise SystemExit(0)
    _, overrides = hydra_keys(overrides)
    try:
        cfg = compose_config(overrides, config_dir)
        obj = OmegaConf.to_object(cfg)
        text = OmegaConf.to_yaml(cfg)
    except ConfigError:
        raise
    except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
        raise ConfigError(one_line(e)) from None
    return obj, text


def load_run_config(rundir: RunDir, overrides: List[str]) -> Config:
    """A run's own config (its config.yaml) with `overrides` on top: what `launcher validate` uses."""
    from hydra import compose

    from launcher.config import history

    schema.register()
    try:
        saved = OmegaConf.load(rundir.config)
        group = saved.job.get("name")
        group = group if (CONF_DIR / "job" / f"{group}.yaml").exists() else "custom"
        with hydra_context(None):
            cfg = compose("config", overrides=[f"job={group}"])
        with open_dict(cfg):  # the saved config was valid when it ran (custom jobs add job.params.*)
            cfg = OmegaConf.merge(cfg, saved)
        for key, value in history.current(rundir).items():  # what resumes changed since
            OmegaConf.update(cfg, key, value, force_add=True)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(cfg)
    except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
        raise ConfigError(one_line(e)) from None


def _precheck(cfg: Config, world_size: int, train_world: int) -> None:
    """Everything that can be rejected without a process group."""
    from launcher import jobs
    import torch
    from launcher.jobs.base import declared_metrics
    from launcher.batch.geometry import geometry

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
        if str(schema.get(cfg, key)).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"{key}={schema.get(cfg, key)} but CUDA is not available on this machine; "
                              f"use {key}=cpu or auto")
    _check_writable(Path(cfg.run.dir or cfg.run.root), "run.dir" if cfg.run.dir else "run.root")
    if cfg.batch.size != "auto":
        geometry(int(cfg.batch.size), cfg.batch.global_size, train_world, exact=True)


def _check_writable(path: Path, key: str) -> None:
    """The nearest existing folder of `path` must be a writable directory."""
    parent = path.resolve()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: cannot create it, {parent} is not a writable directory; "
                          f"choose a writable place with {key}=<dir>")


def _make_run_dir(cfg: Config, config_text: str, overrides: List[str]) -> Tuple[RunDir, bool]:
    """Rank 0: (the run directory, whether this call created it); run.resume=must is checked first."""
    from launcher.checkpoint import store
    from launcher.config import history
    from launcher.validation import control
    from launcher.dist.env import run_id_from_env
    from launcher.files import atomic_write

    run_id = cfg.run.id or run_id_from_env() or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    rundir = RunDir(Path(cfg.run.dir or Path(cfg.run.root) / run_id).resolve())
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
    """Rank 0 chooses (run.dir, else runs/<id>), creates it and writes config.yaml; all ranks receive it
    (or rank 0's ConfigError, so every rank exits 2). Also: whether this session created it."""
    answer = None
    if dist.env.rank == 0:
        try:
            rundir, created = _make_run_dir(cfg, config_text, overrides)
            answer = ("ok", str(rundir), created)
        except ConfigError as e:
            answer = ("error", str(e), False)
    kind, value, created = dist.broadcast_object(answer)
    if kind == "error":
        raise ConfigError(value)
    return RunDir(value), created


def _interrupted(rundir: Optional[RunDir], created: bool) -> int:
    """Ctrl-C before the stop-signal handlers exist (start-up): no traceback; a run directory this
    session created and that holds no checkpoint yet is removed, as if the run never started."""
    from launcher.checkpoint import store

    note = ""
    if rundir is not None and created and rundir.root.exists() and not store.steps(rundir.checkpoints):
        logging.shutdown()
        shutil.rmtree(rundir.root, ignore_errors=True)
        note = f"; removed {rundir}, which held no checkpoint yet"
    print(f"launcher: interrupted during start-up{note}", file=sys.stderr)
    return 130


def _debug_logging(loggers: List[str]) -> None:
    """hydra.verbose=true (every logger) or hydra.verbose=<name>[,...]: DEBUG, on the console too."""
    for name in loggers:
        logging.getLogger(name or None).setLevel(logging.DEBUG)
    for handler in logging.getLogger().handlers if loggers else []:
        handler.setLevel(logging.DEBUG)


def _check_point(overrides: List[str], here: bool) -> Config:
    """One point of a sweep, checked as `train` checks it (`here`: it runs on this machine)."""
    from launcher.dist.env import detect, validation_mode

    cfg, _ = load_config(overrides)
    if not here:
        checks.check(cfg)
        return cfg
    env = detect(validation_mode(cfg.validation.mode, _world()), cfg.validation.rank, cfg.train.device,
                 cfg.validation.share_gpu)
    _precheck(cfg, env.world_size, env.train_world)
    return cfg


def train_command(overrides: List[str]) -> int:
    from launcher import sweep
    from launcher.dist.env import detect, validation_mode

    try:
        if sweep.is_multirun(overrides):
            return sweep.multirun(overrides, _check_point)
        overrides = sweep.from_plan(overrides)  # train --sweep-point <dir> <n> (slurm/sweep.sbatch)
        cfg, text = load_config(overrides)
        debug, _ = hydra_keys(split_config_dir(overrides)[1])
        env = detect(validation_mode(cfg.validation.mode, _world()), cfg.validation.rank, cfg.train.device,
                     cfg.validation.share_gpu)
        _precheck(cfg, env.world_size, env.train_world)
    except ConfigError as e:
        return fail(str(e))

    from launcher.dist import threads
    from launcher.errors import SaveError
    from launcher.dist.groups import Dist
    from launcher.faults import fail_at_start
    from launcher.telemetry import setup_logging
    from launcher.train import train

    from launcher.validation.supervisor import run_validator_rank

    fail_at_start(cfg.debug.fail_at_start, env)
    child = env.is_main and validation_mode(cfg.validation.mode, env.world_size) == "process"
    cpu = threads.apply(cfg.train.threads, env.local_world_size, child)  # before any work: see threads.py
    dist, rundir, created = None, None, False
    finished = False
    try:
        dist = Dist(env, cfg.dist.timeout_s)
        rundir, created = agree_run_dir(cfg, dist, text, overrides)
        setup_logging(rundir.log(env.rank), env.rank, console=env.is_main or env.is_validator)
        _debug_logging(debug)
        log.debug("the resolved config:\n%s", text)
        if env.is_main:
            log.info("CPU threads: %(trainer)d per training process, %(validator)d for the validator process "
                     "(%(cores)d cores; %(source)s)", cpu)
            rundir.event("threads", **cpu)
        if env.is_validator:
            run_validator_rank(env, rundir)
        else:
            train(cfg, env, dist, rundir)
        finished = True
    except KeyboardInterrupt:
        return _interrupted(rundir if env.rank == 0 else None, created)
    except ConfigError as e:
        return fail(str(e))
    except SaveError as e:  # disk full, read-only: one clear line, status 1, the old checkpoints intact
        print(f"launcher: error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist is not None:  # leaving on an exception: a fault on 2+ processes leaves at once (Dist.close)
            dist.close(finished, sys.exc_info()[1])
    return 0


def validate_command(argv: List[str]) -> int:
    """`python -m launcher validate run.dir=<dir> [overrides]`: validate a live or finished run."""
    import torch

    from launcher.validation import control, handoff
    from launcher.telemetry import setup_logging
    from launcher.validation.validator import serve, validator_device

    try:
        positional = [a for a in argv if "=" not in a and not a.startswith("-")]  # `validate <dir>`, as report
        argv = [f"run.dir={a}" if a in positional else a for a in argv]
        given = [a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")]
        if not given:
            raise ConfigError("validate needs the run directory: validate <dir> or validate run.dir=<dir>")
        rundir = RunDir(Path(given[-1]).resolve())
        if not rundir.config.exists():
            raise ConfigError(f"run.dir={rundir} holds no config.yaml; point it at a run directory")
        cfg = load_run_config(rundir, [a for a in argv if not a.startswith("run.dir=")])
        device = validator_device(cfg.validation.device)
    except ConfigError as e:
        return fail(str(e))
    spawned = "LAUNCHER_PARENT_PID" in os.environ
    setup_logging(rundir.log("validator"), "validator", console=not spawned)
    log.info("validator: %d CPU thread(s)", torch.get_num_threads())
    finished = control.done(rundir, or_summary=True) is not None
    # A finished run with nothing left in the queue: re-validate its checkpoints.
    revalidate = not spawned and finished and not handoff.pending(rundir.handoff) \
        and not list(rundir.handoff.glob("*.claimed"))
    n = serve(cfg, rundir, device, revalidate=revalidate)
    log.info("validator done: %d validation(s)", n)
    return 0


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def main(argv: List[str]) -> int:
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:  # Ctrl-C while importing or composing: nothing was created yet
        print("launcher: interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: List[str]) -> int:
    if argv and argv[0] in HYDRA_FLAGS and argv[0] not in ("-h", "--help"):
        argv = ["train", *argv]  # the installed completion script calls `launcher -sc query=bash`
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_command(rest)
    if cmd == "validate":
        return validate_command(rest)
    if cmd == "report":
        from launcher.report import main as report_main

        return report_main(rest)
    if cmd == "sweep":
        from launcher.sweep import command

        try:
            return command(rest)
        except ConfigError as e:
            return fail(str(e))
    return fail(f"unknown command {cmd!r}; use train, validate, report or sweep")


def console() -> None:
    """The `launcher` console script."""
    sys.exit(main(sys.argv[1:]))
