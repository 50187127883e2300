"""Run under torchrun (gloo, CPU): a tiny model trained a few steps with fsdp (fully_shard per layer,
then the root) or ddp, checkpointed and restored through the real Checkpointer.

    ckpt_train.py RUN_DIR --strategy fsdp|ddp --steps N [--every K] [--keep-last M] [--die-at K]
                  [--out FILE] [--loaded FILE] [--blocked]

--die-at K: on the first attempt only (TORCHELASTIC_RESTART_COUNT=0), training rank 0 SIGKILLs itself
right after the step-K checkpoint (torchrun --max-restarts then restarts the group, which resumes).
--out: training rank 0 writes the full final state {"model", "optimizer" (by name), "ema", "step",
"resumed"} there; --loaded: the same, right after the restore.
--blocked: a file stands where checkpoints/ should be, so rank 0 cannot save: every rank writes the
SaveError it got to RUN_DIR/save-error-<rank>.txt and exits 3. Under fsdp the EMA is exported with fsdp.full_state + save_weights to RUN_DIR/ema.safetensors.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from types import SimpleNamespace

import torch
from torch import nn

from launcher.checkpoint.checkpointer import Checkpointer, TrainState
from launcher.errors import SaveError
from launcher.checkpoint.export import save_weights
from launcher.distributed import fsdp
from launcher.distributed.groups import Dist
from launcher.distributed.rng import seed_everything
from launcher.ema import EMA, NoEMA
from launcher.distributed.env import detect
from launcher.optim import build_optimizer, build_scheduler
from launcher.rundir import RunDir
from launcher.distributed.shards import is_sharded
from launcher.train import resumed_from


class Net(nn.Module):
    """Rows that do not divide evenly over 2 or 3 ranks (10, 7, 4: some ranks hold fewer or none)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 10), nn.Linear(10, 7), nn.Linear(7, 4)])
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.tanh(x) if i < len(self.layers) - 1 else x
        return x * self.scale


class Meter:
    def __init__(self):
        self.sum = torch.zeros(())

    def state_dict(self) -> dict:
        return {"loss_sum": self.sum.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.sum = state["loss_sum"].clone()


class Tel:
    def __init__(self, rundir: RunDir, main: bool):
        self.rundir, self.main, self.wandb_id = rundir, main, None

    def event(self, kind: str, **fields) -> None:
        if self.main:
            self.rundir.event(kind, **fields)

    def truncate_after(self, step: int, wandb_id=None) -> None:
        pass


def batch_for(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1234)
    x, y = torch.randn(96, 6, generator=g), torch.randn(96, 4, generator=g)
    rows = slice((step * 12) % 96, (step * 12) % 96 + 12)
    return x[rows].chunk(world)[rank], y[rows].chunk(world)[rank]


def full_state(model, opt, ema) -> dict:
    """The full model, optimizer (by name) and EMA: collective under fsdp."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    shadow = {k: v.full_tensor() if is_sharded(v) else v for k, v in (ema.state_dict() or {"shadow": {}})["shadow"].items()}
    return {"model": msd, "optimizer": osd, "ema": shadow}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--strategy", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, default=0)
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--die-at", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--loaded")
    ap.add_argument("--blocked", action="store_true")
    args = ap.parse_args()

    env = detect(device="cpu")
    dist = Dist(env, timeout_s=120)
    rundir = RunDir(args.run).make() if env.is_main else RunDir(args.run)
    if args.blocked and env.is_main:
        rundir.checkpoints.rmdir()
        rundir.checkpoints.write_text("not a directory")
    dist.barrier()
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(every_steps=args.every, keep_last=args.keep_last, drain_timeout_s=60),
                          run=SimpleNamespace(resume="auto", seed=0), debug=SimpleNamespace(checkpoint_write_delay_s=0))
    torch.manual_seed(0)
    model = Net()
    if args.strategy == "fsdp":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(dist.group, "cpu") if dist.group is not None else None
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped, ema = model, EMA(model, decay=0.8, ramp="none")  # every rank: its own shards
    else:
        wrapped = nn.parallel.DistributedDataParallel(model, process_group=dist.group) \
            if dist.distributed_training else model
        ema = EMA(model, decay=0.8, ramp="none") if env.is_main else NoEMA()
    optim = SimpleNamespace(name="adamw", lr=0.05, momentum=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, fused=False)
    opt = build_optimizer(model, optim, torch.device("cpu"))
    sched = build_scheduler(opt, SimpleNamespace(min_lr=0.1, warmup_bias_lr=None), optim.lr, args.steps, 0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state, meter = TrainState(), Meter()
    ckpt = Checkpointer(cfg.checkpoint, env, dist, rundir, Tel(rundir, env.is_main), state, per_rank={"meter": meter},
                        parts={"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler, "ema": ema},
                        sharded=fsdp.is_fsdp(model))
    found = resumed_from(ckpt.restore(), ckpt.tel, rundir, env, state) if cfg.run.resume != "never" else None
    resumed = found is not None
    if found is None:
        seed_everything(env.rank)
    elif not found.per_rank:  # as the Trainer does after a resume on another number of ranks
        seed_everything(cfg.run.seed + env.rank + 1000 * found.step)
    if args.loaded:
        loaded = full_state(model, opt, ema)
        if env.is_main:
            torch.save({**loaded, "step": state.step, "resumed": resumed}, args.loaded)
    while state.step < args.steps:
        x, y = batch_for(state.step, env.train_rank, env.train_world)
        loss = nn.functional.mse_loss(wrapped(x + 0.01 * torch.randn_like(x)), y)  # per-rank RNG
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        ema.update(model)
        meter.sum += loss.detach()
        state.step += 1
        every = cfg.checkpoint.every_steps
        if state.step == args.steps or (every and state.step % every == 0):
            try:
                ckpt.save(ckpt.snapshot(), final=True)  # waits for its write, agrees on it: SaveError on every rank
            except SaveError as e:
                (rundir.root / f"save-error-{env.train_rank}.txt").write_text(str(e))
                dist.close()
                return 3
        if args.die_at == state.step and env.restart_count == 0 and env.is_main:
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    final = full_state(model, opt, ema)
    if args.strategy == "fsdp":
        full_ema = fsdp.full_state(ema.shadow, keep=env.is_main)
        if env.is_main:
            save_weights(rundir.ema_weights, full_ema, {"step": state.step})
    if env.is_main and args.out:
        torch.save({**final, "step": state.step, "resumed": resumed, "meter": meter.sum}, args.out)
    dist.close(finished=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
