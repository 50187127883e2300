"""Hydra's habits, kept: compose the config the way `@hydra.main` would, without its side effects.

- `--config-dir DIR` / `-cd DIR` adds a user's own config groups to the search path exactly where
  `hydra.main` puts them (after conf/, before the structured schemas), and the run trains with it.
- `hydra.verbose=true|<logger>[,...]` turns on debug logging; the other `hydra.*` keys have no
  meaning here (the launcher creates no Hydra output directory and never changes the working
  directory) and are refused, naming what to use instead.
- wandb's own environment variables (WANDB_MODE, WANDB_PROJECT, ...) win over the config's
  defaults and lose to an explicit `logger.wandb.*=` on the command line, as with `wandb.init`.
- Hydra's flags (--cfg, --help, --info, -sc install=...) run `hydra.main`, with the internal `*_schema`
  configs hidden from help and refused as options, and `--cfg` printing each key's meaning as a comment;
  a TAB (-sc query=...) is answered by completion.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict

from launcher.config import CONF_DIR
from launcher.config.meanings import annotate, meanings
from launcher.config.schema import JOBS, Config, get
from launcher.jobs.base import JobConfig
from launcher.errors import ConfigError

HYDRA_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve", "--package", "-p",
               "--shell-completion", "-sc"}
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
GROUPS = ("job", "optim")
# hydra.* overrides that mean nothing to the launcher, and what to use instead.
HYDRA_INSTEAD = {
    "hydra.run.dir": "use run.dir=<dir> (or run.root=<dir>): the launcher creates no Hydra output directory",
    "hydra.sweep": "use run.dir=<dir>: with -m it is the sweep directory, each point in <dir>/<n>",
    "hydra.job.chdir": "the launcher never changes the working directory; paths are relative to where you "
                       "start it; use run.dir=<dir> for where the run's files go",
    "hydra.output_subdir": "the launcher writes the resolved config to <run.dir>/config.yaml",
    "hydra.job_logging": "logs go to <run.dir>/logs/rank-<r>.log; use hydra.verbose=true for debug logging",
    "hydra.hydra_logging": "use hydra.verbose=true for debug logging",
}
# Keys without a default (`???`), and the form of the value they need.
REQUIRED = {"job.target": "job.target=<package.module>:<Class>, the import path of your Job subclass "
                          "(e.g. job.target=my_job:Spirals; README 'Your own job')"}
# wandb's environment variables and the config keys they fill when not given on the command line.
WANDB_ENV = {"WANDB_MODE": "mode", "WANDB_PROJECT": "project", "WANDB_ENTITY": "entity", "WANDB_NAME": "name",
             "WANDB_RUN_GROUP": "group", "WANDB_TAGS": "tags"}
WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
               "disabled": "disabled"}


def split_config_dir(args: List[str]) -> Tuple[Optional[Path], List[str]]:
    """(the --config-dir directory or None, the other arguments)."""
    config_dir, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=")
        if flag in CONFIG_DIR_FLAGS:
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{a} needs a directory: {a} DIR")
                value, i = args[i + 1], i + 1
            config_dir = Path(value).expanduser().resolve()
            if not config_dir.is_dir():
                raise ConfigError(f"--config-dir {value}: no such directory; give a folder of config groups "
                                  "(e.g. DIR/optim/mysgd.yaml, then optim=mysgd)")
        else:
            rest.append(a)
        i += 1
    return config_dir, rest


def hydra_keys(overrides: List[str]) -> Tuple[List[str], List[str]]:
    """(loggers to set to DEBUG from hydra.verbose, the overrides without hydra.*); refuses the others."""
    loggers, rest = [], []
    for a in overrides:
        key, _, value = a.lstrip("+~").partition("=")
        if not key.startswith("hydra."):
            if key in GROUPS and value.endswith("_schema"):
                raise ConfigError(f"{key}={value}: internal schema, not an option; see `launcher train --help` "
                                  f"for the {key} options")
            rest.append(a)
            continue
        if key == "hydra.verbose":
            names = [n.strip() for n in value.strip("[]").split(",") if n.strip()]
            if names in ([], ["false"], ["False"]):
                continue
            loggers += [""] if names in (["true"], ["True"]) else names
            continue
        if key == "hydra.searchpath":
            rest.append(a)
            continue
        instead = next((v for k, v in HYDRA_INSTEAD.items() if key == k or key.startswith(k + ".")), None)
        raise ConfigError(f"{key} is a Hydra setting the launcher does not use; "
                          + (instead or "use the launcher's own keys (see `launcher train --help`)"))
    return loggers, rest


def compose_config(overrides: List[str], config_dir: Optional[Path] = None) -> DictConfig:
    """The config `hydra.main` would compose, through Hydra's public Compose API: conf/ as the primary
    config directory and `--config-dir` as a search-path entry (after conf/, before the schemas, where
    hydra.main puts it); no output directory, no change of the working directory."""
    from hydra import compose, initialize_config_dir

    search = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir is not None else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[*overrides, *search])
    apply_wandb_env(cfg, overrides)
    return cfg


def apply_wandb_env(cfg: DictConfig, overrides: List[str]) -> None:
    """Command line > wandb's environment variables > the config's defaults."""
    given = {a.partition("=")[0].lstrip("+~") for a in overrides}
    for var, key in WANDB_ENV.items():
        value = os.environ.get(var)
        if value is None or value == "" or f"logger.wandb.{key}" in given:
            continue
        if key == "mode":
            if value.lower() not in WANDB_MODES:
                raise ConfigError(f"{var}={value!r} (environment) is not a wandb mode; use online, offline or "
                                  "disabled, or unset it")
            value = WANDB_MODES[value.lower()]
        with open_dict(cfg):
            OmegaConf.update(cfg, f"logger.wandb.{key}",
                             [t.strip() for t in value.split(",") if t.strip()] if key == "tags" else value)


def _meanings(yaml_text: str) -> dict:
    """Every key's meaning for a printed config: the schema's, and those of the job it names (job.name)."""
    name = re.search(r"^job:\n(?:[ ]{2}.*\n)*?[ ]{2}name: (\S+)", yaml_text, re.M)
    job = JOBS.get(name.group(1) if name else "", JobConfig)
    return {**meanings(Config), **meanings(job, "job.")}


def _hide_schemas(text: str) -> str:
    text = re.sub(r"\b\w+_schema, ", "", text)
    return re.sub(r", \w+_schema\b", "", text)


def hydra_main(args: List[str], config_dir: Optional[Path]) -> None:
    """Hydra's own flags (--cfg job, --help, -sc install=bash, ...), with the internal schemas hidden. (A TAB's
    `-sc query=<shell>` never gets here: launcher/config/completion.py answers it.)"""
    import hydra

    sys.argv = ["launcher", *args, *(["--config-dir", str(config_dir)] if config_dir else [])]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(lambda _: None)()
    finally:
        text = _hide_schemas(out.getvalue())
        if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in args):
            text = annotate(text, _meanings(text))  # each key's one-line meaning, as a YAML comment
        sys.stdout.write(text)
        sys.stdout.flush()


def one_line(e: BaseException) -> str:
    """Hydra/OmegaConf errors span many lines; keep what names the key and the fix."""
    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(e).strip()
    key = getattr(cause, "full_key", None)
    if key and "Key '" in str(cause):  # an unknown key
        parent = key.rpartition(".")[0]
        node = get(Config(), parent) if parent and not parent.startswith("job") else None
        valid = ", ".join(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else ""
        return f"unknown config key '{key}'" + (f"; valid keys under '{parent}': {valid}" if valid else "")
    if "Available options" in text or "Could not find" in text or "Could not load" in text:
        first = text.splitlines()[0]
        options = [ln.strip() for ln in text.splitlines()[1:] if ln.startswith(("\t", " ")) and ln.strip()]
        options = [o for o in options if not o.endswith("_schema") and "provider=" not in o]
        return first + (f"; available: {', '.join(options)}" if options else "")
    msg = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
    if key and type(cause).__name__ == "MissingMandatoryValue":
        return f"{key} is required and not set; set it: {REQUIRED.get(key, f'{key}=<value>')}"
    if key:
        return f"{key}: {msg}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:400]
