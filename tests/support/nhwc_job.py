"""A small conv net that checks the memory layout of what reaches it (issue 14 items 3 and 4).

Its images are a tensor subclass that refuses a channels_last conversion of a loader batch
on the host (`x.contiguous(memory_format=torch.channels_last)` on the main thread, which also
loses pinned memory): the conversion belongs in the copy to the device,
`x.to(device, non_blocking=True, memory_format=torch.channels_last)`. The model refuses an
input that is not channels_last when its own weights are (training with
train.channels_last=true) and, being a conv net, every evaluation input that is not.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from launcher.jobs.base import Job


class HostBatch(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fmt = kwargs.get("memory_format", args[1] if len(args) > 1 else None)
        if func is torch.Tensor.contiguous and fmt == torch.channels_last:
            raise AssertionError("a loader batch was converted to channels_last on the host")
        return super().__torch_function__(func, types, args, kwargs)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if not nhwc and (not self.training or self.conv.weight.is_contiguous(memory_format=torch.channels_last)):
            raise AssertionError(f"{'training' if self.training else 'evaluation'} input is not channels_last")
        x = x.as_subclass(torch.Tensor)
        return self.head(self.conv(x).relu().mean((2, 3)))


class NhwcJob(Job):
    """job=custom job.target=tests.support.nhwc_job:NhwcJob"""

    def model(self) -> nn.Module:
        return Net()

    def datasets(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(640, 3, 6, 6, generator=g), torch.randint(4, (640,), generator=g)
        x = x.as_subclass(HostBatch)
        return TensorDataset(x[:512], y[:512]), TensorDataset(x[512:], y[512:])
