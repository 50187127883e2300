"""The checkpoints directory: which steps it holds, the newest that loads, retention, the .pt format.

`step-00000123.pt` holds the full training state; `step-00000123.json` beside it
holds its sha256 and is written after it, so a checkpoint whose manifest exists
was completely written. A sharded (fsdp) run writes `step-00000123.dcp/` instead
(dcp.py); retention and resume count both kinds alike, and either kind loads into
either strategy. Retention (`prune`) is the Checkpointer's: it runs it after a save was
committed, so a failed save (disk full, read-only directory) never costs the previous
checkpoint. What a checkpoint's state holds (`weights`, `step_epoch`) is read here too, by the
trainer's hand-off and by the validator re-validating a finished run alike.
"""
from __future__ import annotations

import hashlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from launcher.checkpoint import dcp
from launcher.errors import SaveError
from launcher.files import atomic_write, read_json, verify, write_json
from launcher.rundir import checkpoint_name, checkpoint_pattern

log = logging.getLogger(__name__)
PATTERN = checkpoint_pattern()


def _pt(directory: Path, step: int) -> Path:
    return Path(directory) / checkpoint_name(step)


def path_for(directory: Path, step: int) -> Path:
    """The checkpoint of `step`: its .dcp directory when a sharded run wrote one, else the .pt file."""
    sharded = dcp.dir_for(directory, step)
    return sharded if sharded.is_dir() else _pt(directory, step)


def save(directory: Path, step: int, state: dict, before_commit: Callable[[], None] = lambda: None) -> Path:
    """Write `state` as the .pt checkpoint of `step` (streamed to the file and hashed on the way: no
    in-memory copy of it), then its manifest. SaveError if it cannot be written; the earlier
    checkpoints are then untouched. The checkpointer calls it from its background thread.
    `before_commit` runs once the data is durable, before the file gets its name."""
    directory = Path(directory)
    path = _pt(directory, step)
    out: list = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".step-*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        atomic_write(path, lambda f: out.append(torch_save(state, f)), before_replace=before_commit)
        (sha256, size), = out
        write_json(path.with_suffix(".json"), {"step": step, "sha256": sha256, "bytes": size})
    except OSError as e:
        if path.exists() and not path.with_suffix(".json").exists():
            try:  # written but not confirmed: a half-made checkpoint must not look like the newest one
                path.unlink()
            except OSError:
                pass
        raise SaveError(f"could not save checkpoint {path} ({tensor_bytes(state) / 2**20:.1f} MiB): "
                        f"{e.strerror or e}; {_intact(directory, step)}") from e
    shutil.rmtree(dcp.dir_for(directory, step), ignore_errors=True)  # one checkpoint per step
    return path


class _Hashing:
    """A write-only file that hashes what passes through it (sha256 releases the GIL on large buffers)."""

    def __init__(self, f):
        self.f, self.digest, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(memoryview(data).cast("B"))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, f) -> Tuple[str, int]:
    """torch.save into the open binary file `f`; returns (sha256, bytes). The zip records' crc32 is
    not computed (the sha256 covers the file): it cost as much as the write itself."""
    out = _Hashing(f)
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, out)
    finally:
        torch.serialization.set_crc32_options(crc)
    return out.digest.hexdigest(), out.bytes


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a nested state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _intact(directory: Path, step: int) -> str:
    older = [s for s in steps(directory) if s != step]
    return f"the previous checkpoint {path_for(directory, older[0]).name} is intact" if older \
        else "no earlier checkpoint exists"


def save_sharded(directory: Path, step: int, state: dict, own: dict, info: dict, dist, rank: int,
                 before_commit: Callable[[], None] = lambda: None) -> Path:
    """save() for a sharded state: every training rank calls it (dcp.save); SaveError on all."""
    try:
        path = dcp.save(directory, step, state, own, info, dist, rank, before_commit)
    except OSError as e:
        raise SaveError(f"could not save checkpoint {dcp.dir_for(directory, step)}: "
                        f"{e.strerror or e}; {_intact(directory, step)}") from e
    if rank == 0:
        _pt(directory, step).unlink(missing_ok=True)  # one checkpoint per step
        _pt(directory, step).with_suffix(".json").unlink(missing_ok=True)
    return path


def steps(directory: Path) -> List[int]:
    """Checkpointed steps (.pt files and complete .dcp directories), newest first."""
    found = {int(m.group(1)) for p in Path(directory).glob("step-*.pt") if (m := PATTERN.match(p.name))}
    return sorted(found | set(dcp.steps(directory)), reverse=True)


def prune(directory: Path, keep_last: int, protect: Iterable[int] = ()) -> None:
    """Retention: keep the newest `keep_last` complete checkpoints and every step in `protect` (the best,
    the steps still being validated); delete the rest. A save still being written (a `.tmp`) is not a
    checkpoint yet and is left alone."""
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
        want = read_json(manifest)
        verify(data, want["sha256"], want.get("bytes"), path.name)
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


def weights(parts: dict) -> Dict[str, dict]:
    """The weights a checkpoint's parts hold, by kind: `ema` (the average's shadow) and `raw` (the model),
    each where present (no EMA: no `ema`)."""
    found = {"ema": (parts.get("ema") or {}).get("shadow"), "raw": parts.get("model")}
    return {kind: sd for kind, sd in found.items() if sd is not None}


def step_epoch(state: dict) -> int:
    """The epoch a checkpoint's step belongs to, as metrics.jsonl and the hand-off record it. The checkpoint holds
    where the *next* step starts: after an epoch's last step that is the next epoch, at batch 0."""
    done_an_epoch = state["batch_in_epoch"] == 0 and state["step"] > 0
    return state["epoch"] - 1 if done_an_epoch else state["epoch"]
