"""The baseline: a strong hand-written DDP loop with the same model, batch, precision and optimizer
as `launcher train`, and nothing else (no EMA, validation, logging, checkpoints, OOM agreement).

Strong on purpose, so a ratio against it is honest: synthetic batches generated once and kept on
the device (`--data device`, the default: the data path cannot cap both sides), bf16 autocast on a
GPU, fused AdamW on a GPU (`--fused`, default: where the launcher fuses, CUDA), channels_last for
the conv net on a GPU (`--channels-last`), cudnn.benchmark and TF32 matmuls. `--data loader` reads
the job's dataset through a DataLoader instead, like the launcher. It imports torch and the job's
model only: launcher.jobs.synthetic and .base import torch alone, and the `launcher` package root
(imported on the way) only `os`; none of the launcher's machinery, Hydra or OmegaConf, so it runs
on a bare box with torch (tests/test_benchmarks.py checks).
Run with python (one process, no DDP wrapper, like the launcher) or under torchrun.
Rank 0 appends {"step", "time"} rows to --out (JSON lines, like the launcher's metrics.jsonl)
at step --warmup and at the last step, after a device sync, for benchmarks/common.py to time.
"""
import argparse
import itertools
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
p.add_argument("--data", default="device", choices=["device", "loader"])
p.add_argument("--workers", type=int, default=0, help="--data loader only")
p.add_argument("--fused", default="auto", choices=["auto", "true", "false"], help="auto: on CUDA")
p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"], help="auto: conv net on CUDA")
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--out", required=True)
a = p.parse_args()

world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
cuda = torch.cuda.is_available()
device = torch.device("cuda", local) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
if world > 1:
    dist.init_process_group("nccl" if cuda else "gloo")
torch.manual_seed(0)
job = Synthetic(SyntheticJob(**json.loads(a.job)))
conv = job.cfg.model == "resnet"
channels_last = a.channels_last == "true" or (a.channels_last == "auto" and cuda and conv)
memory_format = torch.channels_last if channels_last else torch.contiguous_format
model = job.model().to(device, memory_format=memory_format)
net = DDP(model, device_ids=[local] if cuda else None, gradient_as_bucket_view=True) if world > 1 else model
fused = a.fused == "true" or (a.fused == "auto" and cuda)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, fused=fused)
dtype = torch.bfloat16 if a.precision == "bf16" else None
sync = torch.cuda.synchronize if cuda else (lambda: None)

if a.data == "device":  # a few distinct batches, made once, on the device, in the model's layout
    g = torch.Generator(device=device).manual_seed(1 + rank)
    size, classes = job.cfg.image_size, job.cfg.num_classes
    pool = [(torch.randn(a.batch, 3, size, size, device=device, generator=g).contiguous(memory_format=memory_format),
             torch.randint(classes, (a.batch,), device=device, generator=g)) for _ in range(4)]
    batches = itertools.cycle(pool)
else:
    train_set, _ = job.datasets()
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, drop_last=True)
    loader = DataLoader(train_set, a.batch, sampler=sampler, drop_last=True, num_workers=a.workers,
                        pin_memory=cuda, persistent_workers=a.workers > 0)

    def epochs():
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            for x, y in loader:
                yield (x.to(device, non_blocking=True, memory_format=memory_format),
                       y.to(device, non_blocking=True))
    batches = epochs()


def mark(step: int) -> None:
    sync()
    if rank == 0:
        with open(a.out, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time()}) + "\n")


for step in range(1, a.steps + 1):
    x, y = next(batches)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if step in (a.warmup, a.steps):
        mark(step)
if world > 1:
    dist.destroy_process_group()
