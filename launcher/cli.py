"""Command line: compose the Hydra config, check it, agree on the run directory (startup.py), pick a role.

The normal path uses Hydra's Compose API, so no rank creates Hydra output
directories or changes the working directory, and a bad override becomes one
line and exit status 2 before any process group exists. Hydra's own flags
(--cfg, --help, --info, ...) are handed to `hydra.main` and behave as usual.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Tuple

from omegaconf import OmegaConf, open_dict

from launcher import startup
from launcher.config import checks, completion, schema
from launcher.config.compose import CONF_DIR, HYDRA_FLAGS, compose_config, hydra_keys, hydra_main, one_line, split_config_dir
from launcher.config.schema import Config
from launcher.errors import ConfigError, NothingToDo, report_error, say
from launcher.rundir import RunDir

USAGE = """usage: python -m launcher {train,validate,report,sweep} [args]

  train [overrides]           train (torchrun --nproc_per_node=N -m launcher train for DDP)
  train -m key=a,b [...]      a sweep: one run per point, <sweep dir>/<n> (README "Sweeps")
  validate <dir>              standalone validator for a live or finished run (or run.dir=<dir>)
  report <dir>                plots and a summary of a run (or run.dir=<dir>)
  sweep <dir>                 the summary of a sweep (sweep.md, sweep.json)

Overrides are Hydra's: key=value, group=option (job=synthetic, optim=sgd).
`python -m launcher train --help` lists every key; `--cfg job` prints the config, each key's meaning too."""

log = logging.getLogger("launcher")


def load_config(overrides: List[str]) -> Tuple[Config, str]:
    """Compose, type-check and convert the config; Hydra's own flags run hydra.main and exit."""
    schema.register()
    for a in overrides:
        if a.startswith("+") and not a.lstrip("+").startswith("job.params."):
            raise ConfigError(f"{a!r}: adding keys is not allowed (the schema is fixed); drop the '+' to set "
                              "an existing key, or use +job.params.<name>=... for a custom job")
    config_dir, overrides = split_config_dir(overrides)
    if any(a.split("=")[0] in HYDRA_FLAGS for a in overrides):
        if (completion.asked(overrides) or ("",))[0] == "install":
            completion.warm(config_dir)  # the first TAB reads the cache too
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
    from launcher.config import history

    schema.register()
    try:
        saved = OmegaConf.load(rundir.config)
        group = saved.job.get("name")
        group = group if (CONF_DIR / "job" / f"{group}.yaml").exists() else "custom"
        cfg = compose_config([f"job={group}"])
        with open_dict(cfg):  # the saved config was valid when it ran (custom jobs add job.params.*)
            cfg = OmegaConf.merge(cfg, saved)
        for key, value in history.current(rundir).items():  # what resumes changed since
            OmegaConf.update(cfg, key, value, force_add=True)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(cfg)
    except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
        raise ConfigError(one_line(e)) from None


def _debug_logging(loggers: List[str]) -> None:
    """hydra.verbose=true (every logger) or hydra.verbose=<name>[,...]: DEBUG, on the console too."""
    for name in loggers:
        logging.getLogger(name or None).setLevel(logging.DEBUG)
    for handler in logging.getLogger().handlers if loggers else []:
        handler.setLevel(logging.DEBUG)


def _check_point(overrides: List[str], here: bool) -> Config:
    """One point of a sweep, checked as `train` checks it (`here`: it runs on this machine)."""
    from launcher.distributed.env import detect

    cfg, _ = load_config(overrides)
    if not here:
        checks.check(cfg, world_size=None)  # its processes are known where it runs
        return cfg
    env = detect(cfg.validation.mode, cfg.validation.rank, cfg.train.device, cfg.validation.share_gpu)
    startup.precheck(cfg, env.world_size, env.train_world, data=False)  # each point's launch checks its data
    return cfg


def train_command(overrides: List[str]) -> int:
    """`python -m launcher train [overrides]` (or a sweep with -m): check, then validate (the validator rank)
    or train; the exit status (errors.py)."""
    from launcher import sweep
    from launcher.distributed.env import detect

    try:
        if sweep.is_multirun(overrides):
            return sweep.multirun(overrides, _check_point)
        overrides = sweep.from_plan(overrides)  # train --sweep-point <dir> <n> (slurm/sweep.sbatch)
        cfg, text = load_config(overrides)
        debug, _ = hydra_keys(split_config_dir(overrides)[1])
        env = detect(cfg.validation.mode, cfg.validation.rank, cfg.train.device, cfg.validation.share_gpu)
        startup.precheck(cfg, env.world_size, env.train_world, data=not env.is_validator)
    except ConfigError as e:
        return report_error(str(e))

    from launcher.distributed import threads
    from launcher.errors import SaveError
    from launcher.distributed.groups import Dist
    from launcher.faults import fail_at_start
    from launcher.telemetry.logs import FILE_ONLY, setup_logging
    from launcher.train import Trainer

    from launcher.validation.supervisor import run_validator_rank

    fail_at_start(cfg.debug.fail_at_start, env)
    child = env.is_main and env.validation_mode == "process"
    cpu = threads.apply(cfg.train.threads, env.local_world_size, child)  # before any work: see threads.py
    dist, rundir, created = None, None, False
    finished = False
    try:
        dist = Dist(env, cfg.dist.timeout_s)
        rundir, created = startup.agree_run_dir(cfg, dist, text, overrides)
        setup_logging(rundir.log(env.rank), env.rank, console=env.is_main or env.is_validator)
        _debug_logging(debug)
        log.debug("the resolved config:\n%s", text)
        if env.is_main:
            log.info("CPU threads: %(trainer)d per training process, %(validator)d for the validator process "
                     "(%(cores)d cores; %(source)s)", cpu, extra=FILE_ONLY)
            rundir.event("threads", **cpu)
        if env.is_validator:
            run_validator_rank(env, rundir)
        else:
            Trainer(cfg, env, dist, rundir).build().run()
        finished = True
    except NothingToDo as e:  # a finished run: it says so, changes nothing, exits 0
        say(f"launcher: {e}")
        finished = True
    except KeyboardInterrupt:  # before the stop-signal handlers exist: no traceback, nothing left behind
        removed = startup.remove_unstarted_run(rundir if env.rank == 0 else None, created)
        say(f"launcher: interrupted during start-up{removed}")
        return 130
    except ConfigError as e:  # found only by training (batch.size=auto larger than the data): nothing left behind
        startup.remove_unstarted_run(rundir if env.rank == 0 else None, created)
        return report_error(str(e))
    except SaveError as e:  # disk full, read-only: one clear line, status 1, the old checkpoints intact
        return report_error(str(e), status=1)
    finally:
        if rundir is not None and env.is_main and not finished:
            rundir.fold_rank_events()  # what the other ranks said on their way out
        if dist is not None:  # leaving on an exception: a fault on 2+ processes leaves at once (Dist.close)
            dist.close(finished, sys.exc_info()[1])
    return 0


def validate_command(argv: List[str]) -> int:
    """`python -m launcher validate run.dir=<dir> [overrides]`: validate a live or finished run."""
    import torch

    from launcher.validation import control, handoff
    from launcher.telemetry.logs import setup_logging
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
        return report_error(str(e))
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
    """The commands; launcher/__main__.py catches a Ctrl-C during start-up (before train's own handler)."""
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
            return report_error(str(e))
    return report_error(f"unknown command {cmd!r}; use train, validate, report or sweep")

