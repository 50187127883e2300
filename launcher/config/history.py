"""A resume with changed options: the first launch's config.yaml stays; each resume's changes are recorded.

Checked only when the run directory holds a checkpoint to resume from. The changes (a diff of the
resolved configs, against the config the run last ran with) are printed on the console, appended to
`config-history.yaml` (one YAML document per resume that changed something) and recorded as a
`config_changed` event. A change that breaks exact resume is refused with one line (exit 2) unless
`run.allow_changes=true`: the job (model and data), the batch geometry, the seed (data order and
initial weights), the optimizer's kind and the EMA on/off (their checkpointed state would not fit).
Every other change is applied by the resumed run: the optimizer's and the scheduler's settings are the
config's, not the checkpoint's (optim.Settings); the EMA keeps its configured decay, ramp and tau; the
rest is read from the config as the run goes. tests/config/test_resume_changes.py reads the effects back.
`launcher validate` reads config.yaml with the recorded changes on top (`current`).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Tuple

import yaml
from omegaconf import OmegaConf

from launcher.rundir import RunDir
from launcher.errors import ConfigError

FROZEN = ("job", "batch.size", "batch.global_size", "run.seed", "optim.name", "ema.enabled")
IGNORED = ("run.dir", "run.root", "run.id", "run.resume", "run.allow_changes")  # where/how, not what


def flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _resolved(text: str) -> Dict[str, Any]:
    return flat(OmegaConf.to_container(OmegaConf.create(text), resolve=True))


def history(rundir: RunDir) -> List[dict]:
    if not rundir.config_history.exists():
        return []
    with open(rundir.config_history) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def current(rundir: RunDir) -> Dict[str, Any]:
    """Every key the resumes changed, with its newest value (config.yaml holds the rest)."""
    values: Dict[str, Any] = {}
    for entry in history(rundir):
        values.update({k: change["new"] for k, change in entry["changes"].items()})
    return values


def diff(rundir: RunDir, config_text: str) -> Dict[str, Dict[str, Any]]:
    """{key: {old, new}}: what differs from the config this run last ran with."""
    old = {**_resolved(rundir.config.read_text()), **current(rundir)}
    new = _resolved(config_text)
    # A key the first launch's config lacks is a setting added to the launcher since, not a change.
    keys = [k for k in {**old, **new} if not k.startswith(IGNORED) and (k in old or k.startswith("job."))]
    return {k: {"old": old.get(k), "new": new.get(k)} for k in sorted(keys) if old.get(k) != new.get(k)}


def frozen(changes: Dict[str, Any]) -> List[str]:
    return [k for k in changes if any(k == f or k.startswith(f + ".") for f in FROZEN)]


def _show(changes: Dict[str, Dict[str, Any]], keys: List[str]) -> str:
    return ", ".join(f"{k} ({changes[k]['old']} -> {changes[k]['new']})" for k in keys)


def check(rundir: RunDir, config_text: str, allow: bool) -> Tuple[Dict[str, Dict[str, Any]], List[str]]:
    """(the changes, those that break exact resume); a ConfigError when such a change is not allowed."""
    changes = diff(rundir, config_text)
    breaking = frozen(changes)
    if breaking and not allow:
        raise ConfigError(f"resuming {rundir} with {_show(changes, breaking)} would break exact resume; "
                          "relaunch with the run's values (see its config.yaml), start a new run.dir, or add "
                          "run.allow_changes=true to resume anyway")
    return changes, breaking


def record(rundir: RunDir, changes: Dict[str, Dict[str, Any]], breaking: List[str], overrides: List[str]) -> None:
    """Console, config-history.yaml and a `config_changed` event (rank 0, before training starts)."""
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "launcher train " + " ".join(overrides),
             "changes": changes, "allowed_breaking": breaking}
    with open(rundir.config_history, "a") as f:
        f.write("---\n" + yaml.safe_dump(entry, sort_keys=False))
        f.flush()
    rundir.event("config_changed", changes=changes, allowed_breaking=breaking, command=entry["command"])
    note = f" (run.allow_changes=true: {', '.join(breaking)} changed, the resume is not exact)" if breaking else ""
    lines = [f"  {k}: {c['old']} -> {c['new']}" for k, c in changes.items()]
    print(f"launcher: options changed since the last launch of {rundir}{note}; config.yaml keeps the first "
          f"launch's, {rundir.config_history.name} each resume's:", *lines, sep="\n", file=sys.stderr, flush=True)
