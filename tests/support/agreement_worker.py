"""Run under torchrun (2 ranks): one optimizer step's agreements, counted.

Rank 1 receives SIGUSR1 before the step's OOM agreement. Writes, per rank (<dir>/rank-<r>.json), the stop both ranks
agreed on and how many host-side collectives the step made, with OOM recovery on (the stop flag rides
in the agreement the attempt makes before the last backward) and off (the step-end agreement alone)."""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

from launcher.batch.geometry import Batch
from launcher.batch.recovery import Headroom, Recovery
from launcher.config.schema import Config
from launcher.distributed.agreement import Agreement
from launcher.distributed.env import Env
from launcher.distributed.groups import Dist
from launcher.distributed.signals import StopFlag
from launcher.distributed.wrap import GradSync
from launcher.rundir import RunDir
from launcher.telemetry.off import OFF


CALLS = [0]


def count_collectives():
    """Count every all-reduce (the real gloo one still runs): whoever issues it."""
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
    flag = StopFlag(cfg.run.stop_signals)
    agreement = Agreement(dist, env)
    agreement.flag("stop", lambda: flag.signum)
    agreement.flag("early_stop", lambda: False)
    oom = Recovery(cfg.autobatch, env, RunDir(sys.argv[1]), OFF, Batch(1, 1, world), agreement,
                   Headroom(env.device, None, rank, lambda step: False))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    CALLS[0] = 0
    with oom.attempt(0, GradSync(torch.nn.Linear(1, 1))) as attempt:
        attempt.agree()  # before the last backward
    agreed = agreement.step_end()
    out[f"retries={retries}"] = {"stop": agreed.stop.name, "early": agreed.early_stop, "collectives": CALLS[0]}
    flag.signum = 0
    dist.barrier()
Path(sys.argv[1], f"rank-{rank}.json").write_text(json.dumps({"rank": rank, **out}))
dist.close(finished=True)
