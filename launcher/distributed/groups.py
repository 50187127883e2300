"""Process groups and collectives.

Every rank joins the default group (needed to agree on the run directory), then
all ranks create the training group in the same order. Training collectives use
the training group only, so the validator rank never takes part in one. With one
process there is no group and every collective is the identity.

`Dist.background` is a second gloo group over the same training ranks, for the checkpoint
writer's threads: their collectives (DCP's plan, gathering the ranks' own parts) run beside
the training loop's, and two threads must never share a group (each rank would issue the two
streams of collectives in its own order).
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import secrets
import socket
import sys
import time
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist

from launcher.distributed.env import Env
from launcher.errors import EXIT_RESTART

log = logging.getLogger(__name__)
LEAVE_AFTER_ERROR_S = 1.0  # a rank leaving on an error lets a peer that failed first be seen first (Dist.abandon)


class Group:
    """Collectives over the training ranks (`group`); the identity with one training rank."""

    def __init__(self, env: Env, group: Optional[dist.ProcessGroup] = None):
        self.env, self.group = env, group

    @property
    def distributed_training(self) -> bool:
        return self.group is not None and self.env.train_world > 1

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

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any training rank (a CPU tensor: gloo even on CUDA, no device sync)."""
        return bool(self.all_reduce(torch.tensor([float(flag)]), "max").item())

    def all_gather_object(self, obj: Any) -> list:
        if not self.distributed_training:
            return [obj]
        out = [None] * self.env.train_world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.distributed_training:
            dist.barrier(group=self.group)


class Dist(Group):
    """This process's process groups: joins the default group (every rank, the validator too), creates the
    training group and the checkpoint writer's `background` group over the training ranks, and
    tears them down (`close`, or `abandon` after a fault). Its collectives are the training group's (Group)."""
    def __init__(self, env: Env, timeout_s: float = 1800.0):
        """`timeout_s` (dist.timeout_s): how long joining the group or any collective may wait."""
        super().__init__(env)
        self.background = Group(env)
        timeout = datetime.timedelta(seconds=timeout_s)
        if env.world_size > 1 and not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if env.device.type == "cuda" else "gloo"
            if env.device.type == "cuda":
                torch.cuda.set_device(env.device)
            dist.init_process_group(backend, store=attempt_store(env, timeout), rank=env.rank,
                                    world_size=env.world_size, timeout=timeout)
        if env.world_size > 1:
            # All ranks, the validator included, must create groups in the same order.
            group = dist.new_group(env.train_ranks) if env.validator_rank is not None else dist.group.WORLD
            background = dist.new_group(env.train_ranks, backend="gloo", timeout=timeout) \
                if env.train_world > 1 else None
            if not env.is_validator:
                self.group, self.background.group = group, background

    def broadcast_object(self, obj: Any) -> Any:
        """From global rank 0 to every rank (validator included); used once at start."""
        if self.env.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, finished: bool = False, leaving_on: Optional[BaseException] = None) -> None:
        """`finished`: every rank got here normally, so all first meet (a CPU tensor: gloo even on
        CUDA), and none tears down its gloo connections while a peer still uses them (seen as
        "terminate called without an active exception" on CPU). A rank leaving on an error or a
        signal does not wait for the others; `leaving_on` a fault (an error, an OOM restart's exit 75;
        not a stop signal's agreed exit) with 2+ processes, it leaves without tearing down: `abandon`."""
        if leaving_on is not None and self.env.world_size > 1 and fault(leaving_on):
            self.abandon(leaving_on)
            return
        self.group = self.background.group = None  # the groups' C++ objects go in destroy, not at exit
        if dist.is_initialized() and finished:
            gc.collect()  # a finished run's DDP and fsdp modules hold groups too (cycles): freed now
            destroy_together()
        elif dist.is_initialized():
            dist.destroy_process_group()

    def abandon(self, exc: BaseException) -> NoReturn:
        """Leave now after a fault on 2+ processes: report `exc` as Python would, drop the process groups
        without waiting for their pending collectives, and exit without finalizing the interpreter.

        `destroy_process_group()` waits for pending work (NCCL flushes it since torch 2.6; gloo joins a
        collective in flight), and so does finalizing the interpreter (the groups' destructors): one that
        a dead or diverged peer never joins would hold this rank, and the restarted group with it, for
        `dist.timeout_s` or until torchrun's SIGKILL (tests/distributed/test_teardown.py). On NCCL the communicators
        are aborted (`_abort_process_group`); gloo's abort waits like its destroy, so there the sockets
        are left to the process's end. A rank leaving on an error (often a peer's doing: "Connection closed
        by peer") first waits LEAVE_AFTER_ERROR_S, so that torchrun, which polls its workers, names the
        rank that failed first (an OOM restart's exit 75, which leaves at once) as the root cause.
        Files other processes read are written atomically: none is left torn."""
        code = exc.code if isinstance(exc, SystemExit) else 1
        if not isinstance(exc, SystemExit):
            sys.excepthook(type(exc), exc, exc.__traceback__)
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if dist.is_initialized() and self.env.device.type == "cuda" and abort is not None:
            try:
                abort()
            except Exception as e:  # noqa: BLE001 - leaving anyway: the process's end closes everything
                log.warning("aborting the process groups failed (%s); leaving without", e)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        if code != EXIT_RESTART:
            time.sleep(LEAVE_AFTER_ERROR_S)
        os._exit(code)


def fault(e: BaseException) -> bool:
    """Not a clean, agreed end: an error, or an OOM restart (exit 75). A stop signal's exit (128 + signal)
    is agreed by every rank at the same step, and exit 2 / 1 (bad input, a failed save) are returned."""
    return not isinstance(e, SystemExit) or e.code == EXIT_RESTART


def destroy_together() -> None:
    """Every rank got here normally: all meet (a CPU tensor: gloo even on CUDA), destroy the process
    groups, and none exits before all have destroyed theirs (_leave_together). The caller drops its own
    references to the groups first: a group object still referenced outlives the destroy, and its
    destructor then runs at the interpreter's exit, after a peer may have closed its sockets ("terminate
    called without an active exception", exit -6)."""
    store, world = dist.distributed_c10d._get_default_store(), dist.get_world_size()
    dist.all_reduce(torch.zeros(1))
    dist.destroy_process_group()
    _leave_together(store, world)


def _leave_together(store: dist.Store, world: int, timeout_s: float = 30.0) -> None:
    """After every rank destroyed its process group, none exits before all have: a rank that exits
    closes its gloo sockets under a peer still tearing down its own, and that peer aborts
    ("terminate called without an active exception", exit -6). Counted in the store (rank 0 may host
    it: a peer that finds it gone has nothing left to wait for)."""
    try:
        store.add("launcher/closed", 1)
        deadline = time.monotonic() + timeout_s
        while store.add("launcher/closed", 0) < world and time.monotonic() < deadline:
            time.sleep(0.02)
    except (RuntimeError, OSError):  # the store's host left first: everyone had arrived
        pass


def attempt_store(env: Env, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """A fresh store for this start of the worker group, found through torchrun's agent store
    (None: env:// as usual, where torchrun does not share its store).

    torchrun keeps its store across `--max-restarts` restarts (static and c10d rendezvous alike) and
    the workers' keys carry no round, so a restarted group could read the dead group's gloo
    addresses. Nothing torchrun exports names the round on every node: TORCHELASTIC_RESTART_COUNT
    is per agent (with c10d an agent restarted for a peer's failure does not count it), the c10d
    rendezvous round is not exported, and the agents' own keys live in another store. Counting
    starts in the store drifts when a worker dies before it counts. What every rank of one start
    does agree on is its rank 0, the only rank 0 alive (torchrun stops every worker of a group
    before it starts the next): rank 0 opens a new TCPStore on a free port and publishes
    "<port> <nonce>"; every other rank uses the published store once it has connected to it and
    read the same nonce there, so an address left by a dead rank 0 (nothing listens, or another
    server listens, without that nonce) is never used: the rank reads the key again until the live
    rank 0 has replaced it. No count, so nothing to drift.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    host = os.environ["MASTER_ADDR"]
    agent = dist.TCPStore(host, int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    key = f"/launcher/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/store"
    if env.rank == 0:
        store = dist.TCPStore(host, 0, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = secrets.token_hex(8)
        store.set("launcher/nonce", nonce)
        agent.set(key, f"{store.port} {nonce}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        port, nonce = agent.get(key).decode().split()
        store = _connect(host, int(port), nonce)
        if store is not None:
            store.set_timeout(timeout)
            return store
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {env.rank}: no live rank 0 published its store within {timeout}")
        time.sleep(0.5)


def _connect(host: str, port: int, nonce: str) -> Optional[dist.Store]:
    """The store at host:port if it is the one that published `nonce`, else None (a dead rank 0)."""
    try:
        socket.create_connection((host, port), timeout=5).close()  # refused at once, quietly, when dead
        store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=5))
        if store.get("launcher/nonce").decode() == nonce:
            return store
    except (RuntimeError, ValueError, OSError):  # refused, timed out, not a TCPStore
        pass
    log.info("the store published at %s:%d is gone (a previous start's rank 0); waiting for this start's", host, port)
    return None
