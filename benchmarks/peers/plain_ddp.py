"""The floor a researcher writes by hand: a plain PyTorch (DDP) loop with timm's EMA, validation of the
EMA inline at the end of every epoch, and a checkpoint at every validation and every `ckpt_every` steps
(full state to last.pt; the EMA weights to best.pt when the metric improves).

    python benchmarks/peers/plain_ddp.py --recipe R.json --out M.json          # one process
    torchrun --nproc_per_node=N benchmarks/peers/plain_ddp.py --recipe R.json --out M.json

Every rank keeps the EMA (as timm's own train.py does) and validates its shard of the validation set.
"""
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import recipe

r = recipe.load()
world_size, rank, local_rank = recipe.world()
dev = recipe.device(r, local_rank)
if world_size > 1:
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
recipe.importable_torchvision()
torch.manual_seed(r.seed)
job = recipe.make_job(r)
model = job.model().to(dev)
net = DDP(model, device_ids=[local_rank] if dev.type == "cuda" else None) if world_size > 1 else model
opt = recipe.optimizer(model, r, dev)
sched = recipe.schedule(opt, r)
ema = recipe.timm_ema(model, r)
train_set, val_set = job.datasets()
train = recipe.loader(train_set, r.batch, True, r, world_size, rank, dev)
val = recipe.loader(val_set, r.val_batch, False, r, world_size, rank, dev)
ckpt_dir = Path(r.run_dir) / "checkpoints"
ckpt_dir.mkdir(parents=True, exist_ok=True)


def total(t: torch.Tensor) -> torch.Tensor:
    """A validation sum over the ranks (each validated its shard)."""
    if world_size > 1:
        dist.all_reduce(t)
    return t


def save(path: Path, state: dict) -> None:
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def checkpoint(step: int, epoch: int, best: bool = False) -> None:
    with rec.checkpoint(step):
        if rank == 0:
            save(ckpt_dir / "last.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "scheduler": sched.state_dict(), "ema": ema.state_dict(), "step": step,
                                        "epoch": epoch, "rng": torch.get_rng_state()})
            if best:
                save(ckpt_dir / "best.pt", ema.module.state_dict())


rec = recipe.Recorder(r, "plain", dev, rank)
step = 0
for epoch in range(r.epochs):
    if world_size > 1:
        train.sampler.set_epoch(epoch)
    for x, y in train:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with recipe.autocast(dev, r.precision):
            loss = job.loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        ema.update(model, step=step)
        rec.step(step)
        if r.ckpt_every and step % r.ckpt_every == 0 and step % r.steps_per_epoch:
            checkpoint(step, epoch)
    with rec.validation(step):
        rec.result(step, recipe.evaluate(ema.module, val, job, dev, r.precision, total))
    checkpoint(step, epoch, best=rec.best_improved())
rec.write(world=world_size)
if world_size > 1:
    dist.destroy_process_group()
