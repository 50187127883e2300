"""Shell completion that answers a TAB in tens of milliseconds and offers only what `train` accepts.

Hydra's own completer composes the config on every TAB, which imports torch through the jobs' schemas
(seconds), and offers `hydra.*` keys the launcher refuses. The candidates depend only on the schema, the
config files and which `job=` / `optim=` (and `--config-dir`) the line picks, so they are composed once,
with Hydra, into a table cached under ~/.cache/launcher/completion/ (keyed by the mtimes of the files they
come from: an edited schema or config is seen at the next TAB); a TAB reads the table with the standard
library alone. `-sc install=bash` (Hydra's script) fills the cache for every job and optimizer option.

This module imports nothing heavy at the top: launcher/__main__.py answers `-sc query=<shell>` with it
before torch or Hydra is imported.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from launcher.config import CONF_DIR, JOBS_DIR

COMMANDS = ("train", "validate", "report", "sweep")
GROUPS = ("job", "optim")
FLAGS = ("-sc", "--shell-completion")
EXTRA = {"hydra.verbose": {"value": "true", "choices": ["true", "false"]}}  # the one hydra.* key train takes
Table = Dict[str, dict]  # key -> {"value": the composed value, "choices": [...] for enums and booleans}


def asked(argv: List[str]) -> Optional[Tuple[str, str]]:
    """(action, shell) when the command line asks for completion (`-sc query=bash`, `--shell-completion
    install=fish`, ...), else None."""
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in FLAGS:
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            action, _, shell = value.partition("=")
            return action, shell
    return None


def query(shell: str) -> int:
    """Print the candidates for the line the shell passes in COMP_LINE (bash and zsh: one line; fish: one
    per line). Without COMP_LINE (typed by hand): one line saying what this is for, status 2."""
    line = os.environ.get("COMP_LINE")
    if line is None:
        print("launcher: error: -sc query=<shell> answers the shell's completion script, which sets COMP_LINE; "
              'to install completion run: eval "$(launcher train -sc install=bash)"', file=sys.stderr)
        return 2
    point = os.environ.get("COMP_POINT", "")
    words = candidates(line[: int(point)] if point.isdigit() else line)
    print(("\n" if shell == "fish" else " ").join(words))
    return 0


def candidates(line: str) -> List[str]:
    """What may follow `line` (the command line up to the cursor)."""
    words = line.split()
    current = "" if not words or line[-1:].isspace() else words.pop()
    args = words[_program_end(words):]
    if not args:  # the command itself
        return [c for c in COMMANDS if c.startswith(current)]
    if args[0] != "train" or args[-1] in ("--config-dir", "-cd"):  # a directory: the shell's own completion
        return []
    given = dict(a.split("=", 1) for a in args[1:] if "=" in a and a.split("=", 1)[0] in GROUPS)
    config_dir = _config_dir(args[1:])
    key, eq, value = current.partition("=")
    if eq:
        if key in GROUPS:
            return [f"{key}={o}" for o in options(key, config_dir) if o.startswith(value)]
        entry = table(given.get("job"), given.get("optim"), config_dir).get(key)
        values = (entry or {}).get("choices") or ([entry["value"]] if entry and entry["value"] != "" else [])
        return [f"{key}={v}" for v in values if v.startswith(value)]
    keys = [*table(given.get("job"), given.get("optim"), config_dir), *(f"{g}" for g in GROUPS)]
    base = current[: current.rfind(".") + 1]
    out = set()
    for k in keys:
        if k.startswith(current):
            head, dot, _ = k[len(base):].partition(".")
            out.add(base + head + ("." if dot else "="))
    return sorted(out)


def _program_end(words: List[str]) -> int:
    """Where the arguments start: after `launcher`, or `python -m launcher`."""
    for i, w in enumerate(words):
        if Path(w).name == "launcher":
            return i + 1
    return min(1, len(words))


def _config_dir(args: List[str]) -> Optional[Path]:
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag in ("--config-dir", "-cd"):
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            path = Path(value).expanduser()
            return path.resolve() if value and path.is_dir() else None
    return None


def options(group: str, config_dir: Optional[Path] = None) -> List[str]:
    """A group's options: its yaml files in conf/ and in a --config-dir."""
    dirs = [CONF_DIR / group] + ([config_dir / group] if config_dir else [])
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


def _sources(config_dir: Optional[Path]) -> List[Path]:
    """The files a table comes from: the schema, the jobs (their config dataclasses), the configs, this module."""
    here = Path(__file__).resolve().parent
    files = [here / "schema.py", Path(__file__).resolve(), *JOBS_DIR.glob("*.py"), *CONF_DIR.rglob("*.yaml")]
    return files + (sorted(config_dir.rglob("*.yaml")) if config_dir else [])


def _cache_file(job: Optional[str], optim: Optional[str], config_dir: Optional[Path]) -> Path:
    stamp = hashlib.sha1(repr((job, optim, str(config_dir))).encode())
    for p in _sources(config_dir):
        st = p.stat()
        stamp.update(f"{p}:{st.st_mtime_ns}:{st.st_size}".encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "launcher" / "completion" / f"{stamp.hexdigest()[:16]}.json"


def table(job: Optional[str] = None, optim: Optional[str] = None, config_dir: Optional[Path] = None) -> Table:
    """Every key `train` accepts for this job and optimizer, with its value and choices: from the cache, or
    composed (once, seconds) and cached. An option that does not compose (a typo) offers nothing, cached too."""
    path = _cache_file(job, optim, config_dir)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    try:
        keys = {**_compose(job, optim, config_dir), **EXTRA}
    except Exception:  # noqa: BLE001 - a typo in job=/optim= on the line: nothing to offer, never a traceback
        keys = {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(keys))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: completion still works, composing each time
    return keys


def _compose(job: Optional[str], optim: Optional[str], config_dir: Optional[Path]) -> Table:
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.nodes import BooleanNode, EnumNode

    from launcher.config import schema
    from launcher.config.compose import compose_config

    schema.register()
    overrides = [f"{g}={v}" for g, v in (("job", job), ("optim", optim)) if v]
    cfg = compose_config(overrides, config_dir)
    out: Table = {}

    def walk(node, prefix: str) -> None:
        for k in node.keys():
            child = node._get_node(k)
            if isinstance(child, DictConfig):
                if child._is_missing() or not child.keys():
                    continue  # job.params: free-form, set with +job.params.<name>=
                walk(child, f"{prefix}{k}.")
                continue
            if isinstance(child, ListConfig):
                value = "[" + ",".join(str(v) for v in OmegaConf.to_container(child)) + "]"
            else:
                value = "" if child._is_missing() or child._value() is None else str(child._value())
            choices = [e.name for e in child.enum_type] if isinstance(child, EnumNode) else \
                ["true", "false"] if isinstance(child, BooleanNode) else None
            out[f"{prefix}{k}"] = {"value": value, "choices": choices}

    walk(cfg, "")
    return out


def warm(config_dir: Optional[Path] = None) -> None:
    """Fill the cache for every job and optimizer option (at `-sc install=...`: every TAB is fast, the first too)."""
    for job in [None, *options("job", config_dir)]:
        for optim in [None, *options("optim", config_dir)]:
            table(job, optim, config_dir)
