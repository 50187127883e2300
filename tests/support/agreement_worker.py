"""Run under torchrun (2 ranks): one optimizer step's agreements, counted.

Rank 1 receives SIGUSR1 before the step's OOM agreement. Writes, per rank (<dir>/rank-<r>.json), the stop both ranks
agreed on and how many host-side collectives the step made, with OOM recovery on (the stop rides
in the OOM agreement) and off (the step-end agreement alone)."""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from launcher.batch.geometry import Batch
from launcher.distributed.groups import Dist
from launcher.distributed.env import Env
from launcher.batch.recovery import Headroom, Recovery
from launcher.rundir import RunDir
from launcher.config.schema import Config
from launcher.distributed.signals import Guard
from launcher.telemetry.off import OFF


CALLS = [0]


def count_collectives():
    """Count every all-reduce (the real gloo one still runs): Dist's and oom.py's alike."""
    real = tdist.all_reduce

    def counted(*a, **k):
        CALLS[0] += 1
        return real(*a, **k)
    tdist.all_reduce = counted


rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
env = Env(rank, world, rank, world, 0, None, torch.device("cpu"))
dist = Dist(env)
count_collectives()
out = {}
for retries in (2, 0):
    cfg = Config()
    cfg.autobatch.max_retries = retries
    cfg.run.stop_signals = ["SIGUSR1"]
    guard = Guard(cfg.run, dist, OFF)
    oom = Recovery(cfg.autobatch, env, dist, RunDir(sys.argv[1]), torch.nn.Linear(1, 1), OFF, Batch(1, 1, world),
                   Headroom(env.device, None, rank, lambda step: False), guard)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    CALLS[0] = 0
    with oom.attempt(0) as attempt:
        attempt.agree()  # before the last backward
    stop, early = guard.step_end()
    out[f"retries={retries}"] = {"stop": stop.name, "early": early, "collectives": CALLS[0]}
    guard.flag.signum = 0
    dist.barrier()
Path(sys.argv[1], f"rank-{rank}.json").write_text(json.dumps({"rank": rank, **out}))
dist.close(finished=True)
