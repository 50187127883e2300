"""Checkpoints: atomic, checksummed, last K kept, newest valid one found on resume.

`step-00000123.pt` holds the full training state; `step-00000123.json` beside it
holds its sha256 and is written after it, so a checkpoint whose manifest exists
was completely written. Retention runs only after a save succeeded: a failed save
(disk full, read-only directory) never costs the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

import torch

from launcher.files import atomic_write, read_json, write_json

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^step-(\d+)\.pt$")


def path_for(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


class SaveError(RuntimeError):
    """A checkpoint could not be written; the previous ones are untouched."""


def save(directory: Path, step: int, state: dict, keep_last: int, protect: Iterable[int] = ()) -> Path:
    directory = Path(directory)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    path = path_for(directory, step)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
        write_json(path.with_suffix(".json"), {"step": step, "sha256": hashlib.sha256(data).hexdigest(),
                                               "bytes": len(data)})
    except OSError as e:
        if path.exists() and not path.with_suffix(".json").exists():
            try:  # written but not confirmed: a half-made checkpoint must not look like the newest one
                path.unlink()
            except OSError:
                pass
        older = [s for s in steps(directory) if s != step]
        intact = f"the previous checkpoint {path_for(directory, older[0]).name} is intact" if older \
            else "no earlier checkpoint exists"
        raise SaveError(f"could not save checkpoint {path} ({len(data) / 2**20:.1f} MiB): "
                        f"{e.strerror or e}; {intact}") from e
    prune(directory, keep_last, protect)
    return path


def steps(directory: Path) -> List[int]:
    """Checkpointed steps, newest first."""
    found = [int(m.group(1)) for p in Path(directory).glob("step-*.pt") if (m := PATTERN.match(p.name))]
    return sorted(found, reverse=True)


def prune(directory: Path, keep_last: int, protect: Iterable[int] = ()) -> None:
    protect = set(protect)
    for step in steps(directory)[keep_last:]:
        if step not in protect:
            path = path_for(directory, step)
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)


def load(path: Path, map_location: Any = "cpu") -> dict:
    """Load one checkpoint, verifying its checksum when the manifest is there."""
    data = Path(path).read_bytes()
    manifest = Path(path).with_suffix(".json")
    if manifest.exists():
        want = read_json(manifest)["sha256"]
        if hashlib.sha256(data).hexdigest() != want:
            raise ValueError(f"{path.name}: checksum mismatch (file corrupt or truncated)")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def load_latest(directory: Path, map_location: Any = "cpu") -> Tuple[Optional[Path], Optional[dict], List[str]]:
    """The newest checkpoint that loads; also the reasons the newer ones were skipped."""
    skipped = []
    for step in steps(directory):
        path = path_for(directory, step)
        try:
            return path, load(path, map_location), skipped
        except Exception as e:  # a corrupt file must never stop a resume
            reason = f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("skipping unreadable checkpoint %s", reason)
            skipped.append(reason)
    return None, None, skipped
