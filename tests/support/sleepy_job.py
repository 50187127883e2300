"""A job whose forward pass sleeps, like a GPU-bound step: the training loop's wall time is
then set by the "device", not by how much CPU the (shared, noisy) test machine has left."""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from launcher.jobs.base import Job


class Sleepy(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.net = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.net(x)


class SleepyJob(Job):
    """job=custom job.target=tests.support.sleepy_job:SleepyJob +job.params.sleep_s=0.01"""

    def model(self) -> nn.Module:
        return Sleepy(float(self.cfg.params.get("sleep_s", 0.01)))

    def datasets(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(5000, 40, generator=g), torch.randint(10, (5000,), generator=g)
        return TensorDataset(x[:4000], y[:4000]), TensorDataset(x[4000:], y[4000:])
