"""The checkpoints directory: which steps it holds, the newest that loads, retention, the .pt format.

`step-00000123.pt` holds the full training state; `step-00000123.json` beside it
holds its sha256 and is written after it, so a checkpoint whose manifest exists
was completely written. A sharded (fsdp) run writes `step-00000123.dcp/` instead
(dcp.py); retention and resume count both kinds alike, and either kind loads into
either strategy. Retention runs only after a save succeeded: a failed save (disk
full, read-only directory) never costs the previous checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

import torch

from launcher.checkpoint import dcp
from launcher.errors import SaveError
from launcher.files import atomic_write, read_json, write_json

log = logging.getLogger(__name__)
PATTERN = re.compile(r"^step-(\d+)\.pt$")


def _pt(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def path_for(directory: Path, step: int) -> Path:
    """The checkpoint of `step`: its .dcp directory when a sharded run wrote one, else the .pt file."""
    sharded = dcp.dir_for(directory, step)
    return sharded if sharded.is_dir() else _pt(directory, step)


def save(directory: Path, step: int, state: dict, keep_last: int, protect: Iterable[int] = ()) -> Path:
    directory = Path(directory)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    path = _pt(directory, step)
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
        raise SaveError(f"could not save checkpoint {path} ({len(data) / 2**20:.1f} MiB): "
                        f"{e.strerror or e}; {_intact(directory, step)}") from e
    shutil.rmtree(dcp.dir_for(directory, step), ignore_errors=True)  # one checkpoint per step
    prune(directory, keep_last, protect)
    return path


def _intact(directory: Path, step: int) -> str:
    older = [s for s in steps(directory) if s != step]
    return f"the previous checkpoint {path_for(directory, older[0]).name} is intact" if older \
        else "no earlier checkpoint exists"


def save_sharded(directory: Path, step: int, state: dict, own: dict, info: dict, dist, rank: int,
                 keep_last: int, protect: Iterable[int] = ()) -> Path:
    """save() for a sharded state: every training rank calls it (dcp.save); SaveError on all."""
    try:
        path = dcp.save(directory, step, state, own, info, dist, rank)
    except OSError as e:
        raise SaveError(f"could not save checkpoint {dcp.dir_for(directory, step)}: "
                        f"{e.strerror or e}; {_intact(directory, step)}") from e
    if rank == 0:
        _pt(directory, step).unlink(missing_ok=True)  # one checkpoint per step
        _pt(directory, step).with_suffix(".json").unlink(missing_ok=True)
        prune(directory, keep_last, protect)
    return path


def steps(directory: Path) -> List[int]:
    """Checkpointed steps (.pt files and complete .dcp directories), newest first."""
    found = {int(m.group(1)) for p in Path(directory).glob("step-*.pt") if (m := PATTERN.match(p.name))}
    return sorted(found | set(dcp.steps(directory)), reverse=True)


def prune(directory: Path, keep_last: int, protect: Iterable[int] = ()) -> None:
    protect = set(protect)
    for step in steps(directory)[keep_last:]:
        if step not in protect:
            path = _pt(directory, step)
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            shutil.rmtree(dcp.dir_for(directory, step), ignore_errors=True)


def load(path: Path, map_location: Any = "cpu") -> dict:
    """Load one checkpoint, verifying its checksum when the manifest is there. A .dcp directory loads
    whole, as full tensors (its optimizer state keyed by parameter name)."""
    if Path(path).is_dir():
        return dcp.load_full(path)
    data = Path(path).read_bytes()
    manifest = Path(path).with_suffix(".json")
    if manifest.exists():
        want = read_json(manifest)["sha256"]
        if hashlib.sha256(data).hexdigest() != want:
            raise ValueError(f"{path.name}: checksum mismatch (file corrupt or truncated)")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def load_latest(directory: Path, map_location: Any = "cpu") -> Tuple[Optional[Path], Optional[dict], List[str]]:
    """The newest checkpoint that loads; also the reasons the newer ones were skipped. A .dcp directory
    is only verified (data None): its shards are loaded by every rank into its own template."""
    skipped = []
    for step in steps(directory):
        path = path_for(directory, step)
        try:
            if path.is_dir():
                dcp.verify(path)
                return path, None, skipped
            return path, load(path, map_location), skipped
        except Exception as e:  # a corrupt file must never stop a resume
            reason = f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("skipping unreadable checkpoint %s", reason)
            skipped.append(reason)
    return None, None, skipped
