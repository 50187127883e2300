"""Command line: compose the Hydra config, check it, agree on the run directory, pick a role.

The normal path uses Hydra's Compose API, so no rank creates Hydra output
directories or changes the working directory, and a bad override becomes one
line and exit status 2 before any process group exists. Hydra's own flags
(--cfg, --help, --info, ...) are handed to `hydra.main` and behave as usual.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import List, Tuple

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from launcher import schema
from launcher.schema import Config, ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HYDRA_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--package", "-p",
               "--shell-completion", "-sc", "--config-dir", "-cd"}
USAGE = """usage: python -m launcher {train,validate,report} [args]

  train [overrides]           train (torchrun --nproc_per_node=N -m launcher train for DDP)
  validate run.dir=<dir>      standalone validator for a live or finished run
  report <run_dir>            plots and a summary of a run

Overrides are Hydra's: key=value, group=option (job=synthetic, optim=sgd).
`python -m launcher train --help` lists every key; `--cfg job` prints the config."""

log = logging.getLogger("launcher")


def fail(message: str) -> int:
    print(f"launcher: error: {message}", file=sys.stderr)
    return 2


def _one_line(e: BaseException) -> str:
    """Hydra/OmegaConf errors span many lines; keep what names the key and the fix."""
    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(e).strip()
    key = getattr(cause, "full_key", None)
    if key and "Key '" in str(cause):  # an unknown key
        parent = key.rpartition(".")[0]
        node = schema.get(Config(), parent) if parent and not parent.startswith("job") else None
        valid = ", ".join(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else ""
        return f"unknown config key '{key}'" + (f"; valid keys under '{parent}': {valid}" if valid else "")
    if "Available options" in text or "Could not find" in text or "Could not load" in text:
        first = text.splitlines()[0]
        options = [ln.strip() for ln in text.splitlines()[1:] if ln.startswith(("\t", " ")) and ln.strip()]
        options = [o for o in options if not o.endswith("_schema") and "provider=" not in o]
        return first + (f"; available: {', '.join(options)}" if options else "")
    msg = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
    if key:
        return f"{key}: {msg}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:400]


def load_config(overrides: List[str]) -> Tuple[Config, str]:
    """Compose, type-check and convert the config; Hydra's own flags run hydra.main and exit."""
    schema.register()
    if any(a in ("-m", "--multirun") for a in overrides):
        raise ConfigError("--multirun is not supported under the launcher; run a sweep as separate jobs")
    for a in overrides:
        if a.startswith("+") and not a.lstrip("+").startswith("job.params."):
            raise ConfigError(f"{a!r}: adding keys is not allowed (the schema is fixed); drop the '+' to set "
                              "an existing key, or use +job.params.<name>=... for a custom job")
    if any(a.split("=")[0] in HYDRA_FLAGS for a in overrides):
        import hydra

        sys.argv = ["launcher train"] + overrides
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(lambda _: None)()
        raise SystemExit(0)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None, job_name="launcher"):
            cfg = compose("config", overrides=overrides)
        obj = OmegaConf.to_object(cfg)
        text = OmegaConf.to_yaml(cfg)
    except ConfigError:
        raise
    except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
        raise ConfigError(_one_line(e)) from None
    return obj, text


def load_run_config(run_dir: Path, overrides: List[str]) -> Config:
    """A run's own config (its config.yaml) with `overrides` on top: what `launcher validate` uses."""
    schema.register()
    try:
        saved = OmegaConf.load(run_dir / "config.yaml")
        group = saved.job.get("name")
        group = group if (CONF_DIR / "job" / f"{group}.yaml").exists() else "custom"
        with initialize_config_dir(str(CONF_DIR), version_base=None, job_name="launcher"):
            cfg = compose("config", overrides=[f"job={group}"])
        with open_dict(cfg):  # the saved config was valid when it ran (custom jobs add job.params.*)
            cfg = OmegaConf.merge(cfg, saved)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(cfg)
    except Exception as e:  # Hydra and OmegaConf raise many types; all are bad input here
        raise ConfigError(_one_line(e)) from None


def _precheck(cfg: Config, world_size: int, train_world: int) -> None:
    """Everything that can be rejected without a process group."""
    import jobs
    from launcher.autobatch import batch_geometry

    schema.check(cfg, world_size)
    try:
        job_class = jobs.resolve(cfg.job.target)
        getattr(job_class, "check", lambda _: None)(cfg.job)  # the job's own checks (data dir, extras)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.batch.size != "auto":
        batch_geometry(cfg, int(cfg.batch.size), train_world)


def agree_run_dir(cfg: Config, dist, config_text: str, overrides: List[str]) -> Path:
    """Rank 0 chooses (run.dir, else runs/<id>), creates it and writes config.yaml; all ranks receive it."""
    from launcher.env import run_id_from_env
    from launcher.files import atomic_write

    run_dir = None
    if dist.env.rank == 0:
        run_id = cfg.run.id or run_id_from_env() or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        run_dir = Path(cfg.run.dir or Path(cfg.run.root) / run_id).resolve()
        for sub in ("", "checkpoints", "logs", "val", "best", "handoff"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        from launcher import handoff

        handoff.reset(run_dir)  # before any validator can see a previous session's stop/done markers
        header = "# launcher train " + " ".join(overrides) + "\n"
        atomic_write(run_dir / "config.yaml", lambda f: f.write(header + config_text), mode="w")
    return Path(dist.broadcast_object(str(run_dir) if run_dir else None))


def train_command(overrides: List[str]) -> int:
    from launcher.env import detect, validation_mode

    try:
        cfg, text = load_config(overrides)
        env = detect(validation_mode(cfg.validation.mode, _world()), cfg.validation.rank, cfg.train.device)
        _precheck(cfg, env.world_size, env.train_world)
    except ConfigError as e:
        return fail(str(e))

    from launcher.checkpoint import SaveError
    from launcher.dist import Dist
    from launcher.telemetry import setup_logging
    from launcher.train import train

    dist = Dist(env)
    finished = False
    try:
        run_dir = agree_run_dir(cfg, dist, text, overrides)
        setup_logging(run_dir, env.rank, console=env.is_main or env.is_validator)
        if env.is_validator:
            from launcher.validator import run_validator

            run_validator(cfg, env, run_dir)
        else:
            train(cfg, env, dist, run_dir)
        finished = True
    except ConfigError as e:
        return fail(str(e))
    except SaveError as e:  # disk full, read-only: one clear line, status 1, the old checkpoints intact
        print(f"launcher: error: {e}", file=sys.stderr)
        return 1
    finally:
        dist.close(finished)
    return 0


def _world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", 1))


def main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_command(rest)
    if cmd == "validate":
        from launcher.validator import validate_command

        return validate_command(rest)
    if cmd == "report":
        from launcher.report import main as report_main

        return report_main(rest)
    return fail(f"unknown command {cmd!r}; use train, validate or report")


def console() -> None:
    """The `launcher` console script."""
    sys.exit(main(sys.argv[1:]))
