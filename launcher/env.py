"""Who am I: rank, world, role and device, read from torchrun / Slurm variables.

Pure functions of the environment and the config: no process group, no I/O, so
the CLI can decide everything (and reject bad combinations) before any rank
starts talking to another.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass(frozen=True)
class Env:
    rank: int  # global rank
    world_size: int
    local_rank: int
    local_world_size: int
    restart_count: int  # TORCHELASTIC_RESTART_COUNT
    validator_rank: Optional[int]  # the global rank that validates (mode=rank), else None
    device: torch.device

    @property
    def train_ranks(self) -> List[int]:
        return [r for r in range(self.world_size) if r != self.validator_rank]

    @property
    def is_validator(self) -> bool:
        return self.rank == self.validator_rank

    @property
    def train_rank(self) -> int:
        """Rank inside the training group (-1 on the validator)."""
        return -1 if self.is_validator else self.train_ranks.index(self.rank)

    @property
    def train_world(self) -> int:
        return len(self.train_ranks)

    @property
    def is_main(self) -> bool:
        """Rank 0 of the training group: keeps the EMA, writes the run files."""
        return self.train_rank == 0


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def validation_mode(mode: str, world_size: int) -> str:
    """What `auto` means here: the last rank validates with N >= 2, a local child process with N == 1."""
    if mode == "auto":
        return "rank" if world_size >= 2 else "process"
    return mode


def detect(validation_mode_: str = "off", validation_rank: int = -1, device: str = "auto") -> Env:
    world = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local_rank = _int("LOCAL_RANK", 0)
    vrank = None
    if validation_mode(validation_mode_, world) == "rank" and world >= 2:
        vrank = validation_rank % world
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    else:
        dev = torch.device("cpu")
    return Env(rank=rank, world_size=world, local_rank=local_rank,
               local_world_size=_int("LOCAL_WORLD_SIZE", 1),
               restart_count=_int("TORCHELASTIC_RESTART_COUNT", 0),
               validator_rank=vrank, device=dev)


def run_id_from_env() -> Optional[str]:
    """SLURM_JOB_ID (survives requeue), then TORCHELASTIC_RUN_ID, then the torchrun agent's identity.

    Plain `torchrun` (static rendezvous) sets TORCHELASTIC_RUN_ID to "none" for every launch. A
    timestamp chosen by rank 0 would then differ after `--max-restarts` restarts the worker group, and
    the restarted group would start a fresh run instead of resuming. The agent process (the workers'
    parent) lives through those restarts, so its start time and pid name the run: the same for every
    restart of one torchrun, different for the next torchrun.
    """
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return os.environ["SLURM_JOB_ID"]
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return elastic
    if elastic == "none":
        return agent_run_id()
    return None


def agent_run_id() -> Optional[str]:
    """`<agent start time>-a<agent pid>` from /proc, or None where /proc is missing (not Linux)."""
    try:
        pid = os.getppid()
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time since boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    started = boot + ticks // os.sysconf("SC_CLK_TCK")
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(started)) + f"-a{pid}"
