"""The baseline: a hand-written DDP loop with the same model, data, batch, precision and
optimizer as `launcher train`, and nothing else (no EMA, validation, logging, checkpoints).
Run with python (one process, no DDP wrapper, like the launcher) or under torchrun.
Rank 0 appends {"step", "time"} rows to --out (JSON lines, like the launcher's metrics.jsonl)
at step --warmup and at the last step, after a device sync, for benchmarks/common.py to time.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from launcher.jobs.synthetic import Synthetic, SyntheticJob

p = argparse.ArgumentParser()
p.add_argument("--job", default="{}", help="SyntheticJob fields as JSON")
p.add_argument("--batch", type=int, default=32)
p.add_argument("--steps", type=int, default=50)
p.add_argument("--warmup", type=int, default=10)
p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
p.add_argument("--workers", type=int, default=0)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--out", required=True)
a = p.parse_args()

world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
cuda = torch.cuda.is_available()
device = torch.device("cuda", local) if cuda else torch.device("cpu")
if world > 1:
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
torch.manual_seed(0)
job = Synthetic(SyntheticJob(**json.loads(a.job)))
model = job.model().to(device)
net = DDP(model, device_ids=[local] if cuda else None) if world > 1 else model
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, fused=cuda)
train_set, _ = job.datasets()
sampler = DistributedSampler(train_set, world, rank, shuffle=True, drop_last=True)
loader = DataLoader(train_set, a.batch, sampler=sampler, drop_last=True, num_workers=a.workers, pin_memory=cuda,
                    persistent_workers=a.workers > 0)
dtype = torch.bfloat16 if a.precision == "bf16" else None
sync = torch.cuda.synchronize if cuda else (lambda: None)



def mark(step: int) -> None:
    sync()
    if rank == 0:
        with open(a.out, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time()}) + "\n")


step, epoch = 0, 0
while step < a.steps:
    sampler.set_epoch(epoch)
    epoch += 1
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step in (a.warmup, a.steps):
            mark(step)
        if step == a.steps:
            break
if world > 1:
    dist.destroy_process_group()
