"""Process groups and collectives.

Every rank joins the default group (needed to agree on the run directory), then
all ranks create the training group in the same order. Training collectives use
the training group only, so the validator rank never takes part in one. With one
process there is no group and every collective is the identity.
"""
from __future__ import annotations

import datetime
import os
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from launcher.env import Env


class Dist:
    def __init__(self, env: Env, timeout_s: float = 1800.0):
        self.env = env
        self.group: Optional[dist.ProcessGroup] = None
        if env.world_size > 1 and not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if env.device.type == "cuda" else "gloo"
            if env.device.type == "cuda":
                torch.cuda.set_device(env.device)
            timeout = datetime.timedelta(seconds=timeout_s)  # dist.timeout_s
            dist.init_process_group(backend, store=attempt_store(env, timeout), rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
        if env.world_size > 1:
            # All ranks, the validator included, must create groups in the same order.
            group = dist.new_group(env.train_ranks) if env.validator_rank is not None else dist.group.WORLD
            self.group = None if env.is_validator else group

    @property
    def distributed_training(self) -> bool:
        return self.group is not None and self.env.train_world > 1

    def broadcast_object(self, obj: Any) -> Any:
        """From global rank 0 to every rank (validator included); used once at start."""
        if self.env.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_train(self, obj: Any) -> Any:
        """From training rank 0 to every training rank."""
        if not self.distributed_training:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.env.train_ranks[0], group=self.group)
        return box[0]

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place over the training group; the identity with one training rank."""
        if self.distributed_training:
            dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()), group=self.group)
        return t

    def all_gather_object(self, obj: Any) -> list:
        if not self.distributed_training:
            return [obj]
        out = [None] * self.env.train_world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.distributed_training:
            dist.barrier(group=self.group)

    def close(self, finished: bool = False) -> None:
        """`finished`: every rank got here normally, so all first meet (a CPU tensor: gloo even on
        CUDA), and none tears down its gloo connections while a peer still uses them (seen as
        "terminate called without an active exception" on CPU). A rank leaving on an error or a
        signal does not wait for the others."""
        if dist.is_initialized():
            if finished:
                dist.all_reduce(torch.zeros(1))
            dist.destroy_process_group()


def attempt_store(env: Env, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """torchrun's agent store with a key prefix per worker-group round (None: env:// as usual).

    torchrun keeps its store across `--max-restarts` restarts (static and c10d rendezvous alike), and
    the workers' keys carry no round, so a restarted group can read the dead group's gloo addresses
    and fail to connect. TORCHELASTIC_RESTART_COUNT cannot name the round: with c10d a node restarted
    for a peer's failure does not count it. So every rank counts itself in once per start; the
    round is (count - 1) // world_size, the same on every rank of a round (fixed world size).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    key = f"/launcher/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    round_ = (store.add(f"{key}/starts", 1) - 1) // env.world_size
    return dist.PrefixStore(f"{key}/round_{round_}", store)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's array becomes a tensor so the checkpoint loads with weights_only=True.
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def local_env_for_child() -> dict:
    """Environment for a side process (the local validator): no torchrun identity."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return env
