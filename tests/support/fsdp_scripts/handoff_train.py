"""Run under torchrun (gloo, CPU): the trainer's side of validation under train.strategy=fsdp, as
train.py drives it, without training: a finished run's job model holds its ema.safetensors, is
fully_shard-ed, and its (sharded) state stands in for the sharded EMA. `trainer_side.for_training`
gives every rank its hand-off; every 10 steps all ranks submit a snapshot of it (as the Checkpointer
stages one), rank 0 polls, and at the end finish() drains (mode=process: rank 0 spawned the real validator). Rank 0 prints its summary.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from launcher.checkpoint.staging import Stage
from launcher.distributed.groups import destroy_together
from launcher import jobs
from launcher.validation import trainer_side
from launcher.cli import load_run_config
from launcher.distributed.env import Env
from launcher.rundir import RunDir
from launcher.telemetry import Telemetry
from launcher.telemetry.stalls import Stalls
from tests.support.handoff import snapshot


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rundir = RunDir(Path(a.run_dir))
    cfg = load_run_config(rundir, a.overrides)
    cfg.train.strategy = "fsdp"  # the key part A adds to the schema; before it lands, an attribute
    env = Env(rank, world, rank, world, 0, None, torch.device("cpu"), validation_mode=cfg.validation.mode)
    job = jobs.load(cfg.job)
    model = job.model()
    model.load_state_dict(load_file(str(rundir.ema_weights)))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    ema = SimpleNamespace(shadow=model.state_dict())  # DTensors, as part A's sharded EMA
    tel = Telemetry(rundir, cfg, env, a.steps, enabled=rank == 0)
    val = trainer_side.for_training(cfg, env, rundir, job, None, model, ema, 8, tel, Stalls(), sharded=True)
    stage = Stage(torch.device("cpu"))  # the checkpoint's snapshots, as the Checkpointer stages them
    dist.barrier()  # rank 0's Writer is set up before any rank hands off
    for step in range(1, a.steps + 1):
        stage.fence()
        time.sleep(0.01)  # a training step
        val.poll()
        if val.due(step, 0, False, step == a.steps):
            val.submit(step, 0, snapshot(stage, step, {"ema": ema.shadow}))
        dist.barrier()  # the training steps' collectives
    summary = val.finish(a.steps, 0, snapshot(stage, a.steps, {"ema": ema.shadow}))
    tel.close()
    print(f"rank {rank} {type(val).__name__} summary " + json.dumps(summary), flush=True)
    destroy_together()


if __name__ == "__main__":
    main()
