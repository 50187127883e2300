"""Run under torchrun (2 ranks, gloo): the fsdp batch probe (lockstep search over the real step's pieces,
under a probe Recovery) with a real out-of-memory error on rank 1 above micro-batch `--limit`, raised in
the trial's backward or in its up-front all-gather (`--where`). Writes <out>/rank-<r>.json: the size the
ranks agreed on and the probes, or the error both raised (a failed gather ends the probe). Agreeing
before the backward only, rank 0 would wait forever in a reduce-scatter that rank 1 never issued."""
import argparse
import json
from pathlib import Path

import torch
from torch import nn

from launcher.batch import probe
from launcher.batch.memory import DeviceMemory
from launcher.batch.recovery import Lockstep
from launcher.config.schema import Config
from launcher.distributed import fsdp
from launcher.distributed.env import detect
from launcher.distributed.groups import Dist
from launcher.distributed.wrap import GradSync
from launcher.ema import NoEMA
from launcher.errors import OutOfMemory
from launcher.optim import build_optimizer, build_scheduler
from launcher.step import StepParts, forward_backward, optimizer_step

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--where", choices=["backward", "unshard"], required=True)
ap.add_argument("--limit", type=int, default=20)
a = ap.parse_args()

env = detect(device="cpu")
dist = Dist(env, timeout_s=60)
torch.manual_seed(0)
model = fsdp.shard(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)),
                   dist.group, env.device, "fp32")
cfg, size = Config(), [0]


def inject(*_):
    if env.rank == 1 and size[0] > a.limit:
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected in the probe's {a.where})")


if a.where == "backward":
    model[4].register_full_backward_pre_hook(inject)  # the first module a backward reaches
else:
    gather = fsdp.unshard_for_step
    fsdp.unshard_for_step = lambda m: (gather(m), inject())  # the gather done, its copy-out fails


class Job:
    @staticmethod
    def loss(out, y):
        return nn.functional.cross_entropy(out, y)


def trial(n: int, rec) -> None:
    """Two optimizer steps at n with a throwaway optimizer: the Trainer's step (forward_backward, optimizer_step)."""
    size[0] = n
    opt = build_optimizer(model, cfg.optim, env.device)
    parts = StepParts(opt, build_scheduler(opt, cfg.sched, cfg.optim.lr, 2, 0),
                      torch.amp.GradScaler("cpu", enabled=False), NoEMA())
    x, y = torch.randn(n, 8), torch.randint(4, (n,))
    grads = GradSync(model, probe=True)
    for step in range(2):
        forward_backward(x, y, rec, grads, model, Job, parts.scaler, env.device, "fp32", step)
        optimizer_step(model, parts, cfg, step, gate=False)


try:
    out = probe.search(probe.train_trial(trial, env, dist, model), 4, 64, 10, DeviceMemory(env.device, 0.9), 0.0,
                       Lockstep(dist))
    row = {"found": out.found, "probes": [[p.size, p.ok, p.fits] for p in out.probes]}
except OutOfMemory as e:
    row = {"error": str(e)}
Path(a.out, f"rank-{env.rank}.json").write_text(json.dumps({"rank": env.rank, **row}))
dist.close(finished=True)
