"""A job whose last training rank fails at one step with a collective of its own still in flight:
an all-reduce on a side group that the other ranks never join (a diverged peer, an NCCL kernel
waiting for a dead one). Leaving cleanly would wait for that collective until dist.timeout_s.

    job=custom job.target=tests.support.stuck_job:StuckJob +job.params.fail_at_forward=3
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from launcher.jobs.base import Job


class Stuck(nn.Module):
    def __init__(self, fail_at: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
        self.side = dist.new_group(list(range(dist.get_world_size())))  # every rank, in the same order
        self.fail_at, self.calls, self.pending = fail_at, 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at and dist.get_rank() == dist.get_world_size() - 1:
            self.pending = dist.all_reduce(torch.ones(4), group=self.side, async_op=True)  # nobody joins it
            raise RuntimeError("injected failure with a collective in flight")
        return self.net(x)


class StuckJob(Job):
    def model(self) -> nn.Module:
        return Stuck(int(self.cfg.params.get("fail_at_forward", 3)))

    def datasets(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(1200, 40, generator=g), torch.randint(10, (1200,), generator=g)
        return TensorDataset(x[:1000], y[:1000]), TensorDataset(x[1000:], y[1000:])
