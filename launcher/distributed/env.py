"""Who am I: rank, world, role, device and validation mode, read from torchrun / Slurm variables.

Functions of the environment and the config, without a process group, so the CLI can decide
everything (and reject bad combinations) before any rank starts talking to another. They read
environment variables and, for the run id under plain torchrun, /proc (`agent_run_id`); nothing
else, and they write nothing.
"""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from launcher.config.schema import validation_mode
from launcher.errors import ConfigError


@dataclass(frozen=True)
class Env:
    """This process's place in the launch, decided once by `detect` before any process group: its global
    and local rank, the world sizes, torchrun's restart count, the validator rank (if any), its device and
    the resolved `validation.mode` (`validation_mode`: auto made concrete). Every component asks this,
    not the environment or the config, who it is."""
    rank: int  # global rank
    world_size: int
    local_rank: int
    local_world_size: int
    restart_count: int  # TORCHELASTIC_RESTART_COUNT
    validator_rank: Optional[int]  # the global rank that validates (mode=rank), else None
    device: torch.device
    validation_mode: str = "off"  # validation.mode resolved for this launch: rank, process, inline, off, external

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
        """Rank 0 of the training group: writes the run files; under ddp it alone keeps the EMA (under fsdp
        every training rank keeps its shards)."""
        return self.train_rank == 0


def layout(env: Env, sharded: bool = False) -> str:
    """This launch's processes in words, for the start line: `1 training rank + 1 validator rank`,
    `2 training ranks (DDP) + a validator process`, ..."""
    n, mode = env.train_world, env.validation_mode
    ranks = f"{n} training rank" + (f"s ({'FSDP' if sharded else 'DDP'})" if n > 1 else "")
    return ranks + {"rank": " + 1 validator rank", "process": " + a validator process", "inline": ", validating inline",
                    "off": ", no validation", "external": ", validated elsewhere"}.get(mode, "")


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def detect(mode: str = "off", validation_rank: int = -1, device: str = "auto", share_gpu: bool = False) -> Env:
    """Read torchrun's variables, resolve `validation.mode` (`mode`; auto: rank with 2+ processes, else
    process) and pick this process's device (a ConfigError where the launch cannot work)."""
    world = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local_rank = _int("LOCAL_RANK", 0)
    local_world = _int("LOCAL_WORLD_SIZE", 1)
    mode = validation_mode(mode, world)
    vrank = None
    if mode == "rank" and world >= 2:
        vrank = validation_rank % world
    first = rank - local_rank  # torchrun numbers a node's processes consecutively
    vlocal = vrank - first if vrank is not None and first <= vrank < first + local_world else None
    count = torch.cuda.device_count() if device != "cpu" else 0
    dev = assign_device(local_rank, local_world, count, device, vlocal, share_gpu)
    return Env(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
               restart_count=_int("TORCHELASTIC_RESTART_COUNT", 0),
               validator_rank=vrank, device=dev, validation_mode=mode)


def assign_device(local_rank: int, local_world_size: int, device_count: int, device: str = "auto",
                  validator_local_rank: Optional[int] = None, share_gpu: bool = False) -> torch.device:
    """This process's device from the node's shape alone (pure, so it is tested without GPUs).

    One GPU per process, in local-rank order. More processes on a node than GPUs is a ConfigError,
    not `local_rank % device_count`: two ranks on one GPU make NCCL fail on a duplicate GPU (or both
    run out of memory) long after the start. One exception, asked for explicitly: with
    `validation.share_gpu=true` the validator rank on a node with exactly one process more than
    GPUs shares the last GPU with the trainer there, so every GPU trains.
    `validator_local_rank`: the validator's local rank if it runs on this node, else None.
    """
    if device == "cpu" or (device == "auto" and device_count == 0):
        return torch.device("cpu")
    if device_count == 0:
        require_cuda("train.device", device, visible=0)
    if local_world_size <= device_count:
        return torch.device("cuda", local_rank)
    trainers = local_world_size - (validator_local_rank is not None)
    if validator_local_rank is not None and share_gpu and trainers == device_count:
        if local_rank == validator_local_rank:
            return torch.device("cuda", device_count - 1)
        return torch.device("cuda", local_rank - (local_rank > validator_local_rank))
    raise ConfigError(oversubscribed(local_world_size, device_count, validator_local_rank is not None, share_gpu))


def shares_gpu_with_validator(env: Env, device_count: int) -> bool:
    """Whether this process's GPU holds a trainer and a validator at once (pure: tested without GPUs), asked
    by both sides. mode=process: training rank 0's, when the node has no GPU that no trainer uses for its side
    process (see supervisor.child_device); mode=rank: `validation.share_gpu`, the one launch with more
    processes on a node than GPUs, where the validator rank and the last GPU's trainer share it
    (assign_device): true on both of them."""
    mode = env.validation_mode
    if env.device.type != "cuda":
        return False
    if mode == "process":
        return env.is_main and device_count <= env.local_world_size
    return mode == "rank" and env.local_world_size > device_count and env.device.index == device_count - 1


def oversubscribed(processes: int, gpus: int, validator_here: bool, share_gpu: bool) -> str:
    """One line: how many GPUs there are and which launches fit them."""
    msg = (f"{processes} processes on this node but only {gpus} GPU(s) visible: one process per GPU; "
           f"launch torchrun --nproc_per_node={gpus}")
    if not validator_here:
        return msg + " (or use train.device=cpu)"
    auto = f" ({gpus - 1} training ranks + the validator rank on its own GPU)" if gpus > 1 else \
        " (with one process validation.mode=auto runs the validator as a side process on the same GPU)"
    process = f", or --nproc_per_node={gpus} with validation.mode=process ({gpus} training ranks, the " \
              "validator as a side process on a shared GPU)" if gpus > 1 else ""
    if processes == gpus + 1 and not share_gpu:
        return (f"{processes} processes on this node but only {gpus} GPU(s) visible: the validator rank would "
                f"share a GPU with a trainer; set validation.share_gpu=true to allow it (all {gpus} GPUs train, "
                f"the validator on GPU {gpus - 1}), or launch torchrun --nproc_per_node={gpus}{auto}{process}")
    return (msg + auto + process + f", or --nproc_per_node={gpus + 1} with validation.share_gpu=true "
            f"(all {gpus} GPUs train, the validator shares GPU {gpus - 1})")


def require_cuda(key: str, value: str, visible: Optional[int] = None) -> None:
    """A device key asking for CUDA (cuda, cuda:<n>) where no GPU is visible: one ConfigError that says why
    (the one place that refuses it; `visible`: the device count where the caller knows it)."""
    if not str(value).startswith("cuda"):
        return
    count = torch.cuda.device_count() if visible is None else visible
    if count:
        return
    build = "this torch is a CPU-only build" if torch.version.cuda is None else \
        f"torch built for CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}"
    raise ConfigError(f"{key}={value} but no CUDA GPU is visible ({build}); use {key}=auto or {key}=cpu")


def run_id(configured: Optional[str], prefix: str = "") -> str:
    """The run's id: run.id, else the scheduler's (run_id_from_env), else `<prefix><time>-<4 hex>`."""
    return configured or run_id_from_env() or f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


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


def child_environ() -> dict:
    """os.environ for a side process (the local validator): no torchrun identity."""
    environ = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        environ.pop(k, None)
    return environ
