"""Every path of a run directory, and typed records of the files in it.

Writers (trainer, validator) and readers (report, a resumed trainer, a standalone
validator) name files only through `RunDir`, so the layout (see docs/run-directory.md)
lives in one place. Records that cross a process boundary are dataclasses; files
another process reads are written atomically. Each file has one writing process, with these
exceptions: the append-only logs, whose lines are single O_APPEND writes, val/skipped.jsonl (the
trainer's hand-off, on every fsdp training rank, and the validator both skip or drop snapshots) and
val/results.jsonl (the live validator, and `launcher validate` re-validating a finished run);
handoff/validator.json (the validator's heartbeat, and the validator rank's supervisor recording a
dead child); and autobatch.json (the probe's choice and in-place reductions by training rank 0, an
exit-75 restart's reduction by the rank that ran out of memory, while the others wait in a
collective: never two at once). Events of processes other than training rank 0 go to
logs/events-rank-<r>.jsonl until rank 0 folds them into events.jsonl.
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from launcher.files import append_jsonl, read_json, read_jsonl, write_json

# Step files, named and parsed here alone: checkpoints (checkpoints/step-00000123.pt or .dcp/) and hand-off
# snapshots (handoff/00000123.safetensors, its manifest 00000123.json/.claimed/..., fsdp pieces and tickets).
SNAPSHOT_MANIFEST = re.compile(r"^(\d+)\.json$")
SNAPSHOT_PIECE = re.compile(r"^(\d+)\.(shard-\d+-of-\d+\.safetensors|ticket-\d+-of-\d+)$")


def step_stem(step: int) -> str:
    return f"{step:08d}"


def checkpoint_name(step: int, sharded: bool = False) -> str:
    return f"step-{step_stem(step)}.{'dcp' if sharded else 'pt'}"


def checkpoint_pattern(sharded: bool = False) -> "re.Pattern[str]":
    return re.compile(rf"^step-(\d+)\.{'dcp' if sharded else 'pt'}$")


def snapshot_name(step: int, suffix: str) -> str:
    """A snapshot's data (`safetensors`) or its manifest in one of its states (`json`, `claimed`, ...)."""
    return f"{step_stem(step)}.{suffix}"


def piece_name(step: int, rank: int, world: int) -> str:
    return snapshot_name(step, f"shard-{rank}-of-{world}.safetensors")


def ticket_name(step: int, k: int, world: int) -> str:
    return snapshot_name(step, f"ticket-{k}-of-{world}")


@dataclass
class ValResult:
    """One line of val/results.jsonl: one set of weights of one step, evaluated."""
    step: int
    epoch: int
    weights: str  # ema | raw
    metrics: Dict[str, float]
    seconds: float
    time: float = field(default_factory=time.time)
    source: Optional[str] = None  # "checkpoint" when re-validated from a finished run's checkpoints
    samples_per_s: Optional[float] = None  # evaluation throughput (loading the weights not counted)
    batch_size: Optional[int] = None  # the evaluation batch it ran with (halved after an out-of-memory error)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, row: dict) -> "ValResult":
        return cls(**_fields(cls, row))


@dataclass
class Best:
    """best/best.json: the best validation so far of the primary weights."""
    step: int
    epoch: int
    metric: str
    value: float
    weights: str


@dataclass
class Manifest:
    """handoff/<step>.json: a complete snapshot's description; it exists only once its data is complete."""
    step: int
    epoch: int
    weights: List[str]
    file: str
    sha256: str
    bytes: int
    time: float


@dataclass
class AutobatchRecord:
    """autobatch.json: what the probe tried and chose, and every runtime reduction since."""
    signature: List[dict] = field(default_factory=list)  # per rank: device, settings; a resume must match
    requested: Any = None  # batch.size
    global_size: Optional[int] = None  # batch.global_size
    train_world: int = 1
    reason: str = ""
    micro_batch: int = 0
    step_batch: int = 0
    accum: int = 1
    global_batch: int = 0
    found: Optional[int] = None
    probes: Optional[int] = None  # the most probes any rank ran
    seconds: Optional[float] = None
    per_rank: List[dict] = field(default_factory=list)  # {"rank", "found", "probes": [Probe as dict], ...}
    oom_retries: List[dict] = field(default_factory=list)
    backward_headroom_bytes: Optional[List[Optional[int]]] = None  # per rank, at the chosen micro-batch (CUDA)
    validator_budget_bytes: Optional[int] = None  # left to a validator on this GPU (validation.gpu_share x memory)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def reduced(self, step: int, phase: str, ranks: List[int], micro: int, accum: int,
                restart: bool = False) -> "AutobatchRecord":
        """This record after a runtime OOM halved the micro-batch to `micro` at `step`."""
        retry = {"step": step, "phase": phase, "ranks": ranks, "micro_from": self.micro_batch, "micro_to": micro,
                 **({"restart": True} if restart else {})}
        return dataclasses.replace(self, micro_batch=micro, accum=accum, oom_retries=[*self.oom_retries, retry])


def _fields(cls, data: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _read(cls, path: Path):
    """A record from its JSON file; None when it is missing, torn or not that record."""
    try:
        return cls(**_fields(cls, read_json(path)))
    except (OSError, ValueError, TypeError):
        return None


class RunDir:
    """A run directory: `RunDir(path)`; `RunDir.of(x)` accepts a RunDir or a path."""

    SUBDIRS = ("checkpoints", "logs", "val", "best", "handoff")

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    @classmethod
    def of(cls, where: Union["RunDir", str, Path]) -> "RunDir":
        return where if isinstance(where, RunDir) else cls(where)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def make(self) -> "RunDir":
        for sub in ("", *self.SUBDIRS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------------------------ paths
    config = property(lambda self: self.root / "config.yaml")  # the first launch's; never rewritten on resume
    config_history = property(lambda self: self.root / "config-history.yaml")  # each resume's changes
    metrics = property(lambda self: self.root / "metrics.jsonl")
    events = property(lambda self: self.root / "events.jsonl")
    autobatch = property(lambda self: self.root / "autobatch.json")
    summary = property(lambda self: self.root / "summary.json")
    ema_weights = property(lambda self: self.root / "ema.safetensors")
    wandb_id = property(lambda self: self.root / "wandb_id")
    wandb = property(lambda self: self.root / "wandb")
    checkpoints = property(lambda self: self.root / "checkpoints")
    logs = property(lambda self: self.root / "logs")
    handoff = property(lambda self: self.root / "handoff")
    results = property(lambda self: self.root / "val" / "results.jsonl")
    skipped = property(lambda self: self.root / "val" / "skipped.jsonl")
    best_json = property(lambda self: self.root / "best" / "best.json")
    best_weights = property(lambda self: self.root / "best" / "model.safetensors")
    stop = property(lambda self: self.handoff / "stop.json")
    done = property(lambda self: self.handoff / "done.json")
    status = property(lambda self: self.handoff / "validator.json")
    validator_restarts = property(lambda self: self.handoff / "validator-restarts.jsonl")  # validator rank only
    report = property(lambda self: self.root / "report")

    def log(self, rank: Union[int, str]) -> Path:
        return self.logs / f"rank-{rank}.log"

    @property
    def validator_stderr(self) -> Path:
        return self.logs / "validator-stderr.log"

    # ---------------------------------------------------------------------------------- records
    def append_result(self, row: ValResult) -> None:
        append_jsonl(self.results, row.to_dict())

    def read_results(self) -> List[ValResult]:
        return [ValResult.from_dict(r) for r in read_jsonl(self.results)]

    def write_best(self, best: Best) -> None:
        write_json(self.best_json, dataclasses.asdict(best))

    def read_best(self) -> Optional[Best]:
        return _read(Best, self.best_json)

    def write_autobatch(self, record: AutobatchRecord) -> None:
        write_json(self.autobatch, record.to_dict())

    def read_autobatch(self) -> Optional[AutobatchRecord]:
        return _read(AutobatchRecord, self.autobatch)

    def write_summary(self, summary: dict) -> None:
        write_json(self.summary, summary)

    def read_summary(self) -> Optional[dict]:
        try:
            return read_json(self.summary)
        except (OSError, ValueError):
            return None

    def event(self, kind: str, **fields: Any) -> dict:
        """A line of events.jsonl: training rank 0's (the file's one writer) through Telemetry, or a
        process's own before telemetry exists (the CLI on rank 0)."""
        row = {"event": kind, "time": time.time(), **fields}
        append_jsonl(self.events, row)
        return row

    def rank_events(self, rank: int) -> Path:
        """logs/events-rank-<r>.jsonl: events of a process other than training rank 0 (an OOM restart or
        give-up on another rank), folded into events.jsonl by rank 0 (`fold_rank_events`)."""
        return self.logs / f"events-rank-{rank}.jsonl"

    def rank_event(self, rank: int, kind: str, /, **fields: Any) -> dict:
        """An event of global rank `rank`: events.jsonl for rank 0, else its own file."""
        if rank == 0:
            return self.event(kind, **fields)
        row = {"event": kind, "time": time.time(), **fields}
        self.logs.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.rank_events(rank), row)
        return row

    def fold_rank_events(self) -> List[dict]:
        """Training rank 0: move the other processes' events into events.jsonl (oldest first); returns them."""
        rows = sorted((r for f in sorted(self.logs.glob("events-rank-*.jsonl")) for r in read_jsonl(f)),
                      key=lambda r: r.get("time", 0))
        for row in rows:
            append_jsonl(self.events, row)
        for f in self.logs.glob("events-rank-*.jsonl"):
            f.unlink(missing_ok=True)
        return rows

    def read_events(self) -> List[dict]:
        """events.jsonl and any events of other ranks not folded in yet."""
        rows = read_jsonl(self.events) + [r for f in sorted(self.logs.glob("events-rank-*.jsonl"))
                                          for r in read_jsonl(f)]
        return sorted(rows, key=lambda r: r.get("time", 0))

    def restarted_validator(self, restart: int, returncode: int, backoff_s: float) -> None:
        """The validator rank restarted its child (written by that rank alone; training rank 0 turns each
        line into a `validator_restart` event, so events.jsonl keeps its single writer)."""
        append_jsonl(self.validator_restarts, {"restart": restart, "returncode": returncode, "backoff_s": backoff_s,
                                               "time": time.time()})

    def skip(self, step: int, reason: str, detail: str = "") -> None:
        """A snapshot that will never be validated, and why (stale, corrupt, busy, write_failed)."""
        append_jsonl(self.skipped, {"step": step, "reason": reason, "detail": detail, "time": time.time()})


class SweepDir:
    """A sweep (`launcher train -m ...`): one run directory per point, `<root>/<n>`, and the sweep's files."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    plan = property(lambda self: self.root / "sweep-plan.json")  # the points' overrides, written first
    summary_json = property(lambda self: self.root / "sweep.json")
    summary_md = property(lambda self: self.root / "sweep.md")
    lock = property(lambda self: self.root / ".sweep.lock")

    def point(self, n: int) -> RunDir:
        return RunDir(self.root / str(n))

    def status(self, n: int) -> Path:
        """status/<n>.json: the exit status of the point's last process."""
        return self.root / "status" / f"{n}.json"
