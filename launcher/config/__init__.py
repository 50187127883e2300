"""The config: typed schema, the rules a type cannot express, Hydra composition, resume history, completion.

Where the shipped configs and jobs live, found without importing anything heavy (shell completion needs it):
installed from a wheel they are package data and a subpackage (launcher/conf, launcher/jobs); in a
checkout, the repository's top-level conf/ and jobs/.
"""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]
CONF_DIR = next(d for d in (_PACKAGE / "conf", _PACKAGE.parent / "conf") if (d / "config.yaml").exists())
JOBS_DIR = next(d for d in (_PACKAGE / "jobs", _PACKAGE.parent / "jobs") if (d / "__init__.py").exists())
