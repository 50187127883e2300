"""Device memory as the batch probe sees it: the real CUDA caching allocator.

`DeviceMemory` measures one trial step. Before each trial it collects garbage and
empties the allocator's cache, so blocks cached by an earlier (smaller or larger)
trial are not counted again: with only `reset_peak_memory_stats`, the reserved peak
of a trial at 2n reads roughly R(n) + R(2n) while growing, and after one trial over
the limit every later trial reads over it too. The peak is then what the step itself
reserved (its tensors plus the allocator's rounding and fragmentation), plus what the
device holds outside the allocator (CUDA context, NCCL, other processes), plus
`extra_bytes` the caller knows training will add.

Tests and benchmarks/autobatch.py pass another allocator with the same six calls
(tests/support/simulated_device.py: a caching allocator modelled on the CPU).
"""
from __future__ import annotations

import gc
from typing import Optional, Tuple

import torch


class CudaAllocator:
    """The few allocator calls DeviceMemory needs, for one CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        gc.collect()  # a failed trial's graph may sit in reference cycles
        torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def max_reserved(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def mem_get_info(self) -> Tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)


class DeviceMemory:
    """Peak memory of one trial (see the module's docstring); nothing to measure on a CPU (limit None)."""

    def __init__(self, device: torch.device, fraction: float, extra_bytes: int = 0, allocator=None,
                 own_only: bool = False):
        """`own_only`: count this process's allocator alone, not memory outside it (a validator probing
        within its share of a GPU a trainer also uses: the trainer's memory is not its own)."""
        self.device, self.extra, self.own_only = device, extra_bytes, own_only
        self.alloc = allocator if allocator is not None else CudaAllocator(device) if device.type == "cuda" else None
        self.cuda = device.type == "cuda"
        self.total = self.alloc.mem_get_info()[1] if self.alloc is not None else 0
        self.limit: Optional[int] = int(fraction * self.total) if self.alloc is not None else None
        self.outside = 0

    def start(self) -> None:
        if self.alloc is None:
            return
        self.alloc.synchronize()
        self.alloc.empty_cache()  # earlier trials' cached blocks are not this trial's memory
        self.alloc.reset_peak()
        free, total = self.alloc.mem_get_info()
        self.outside = 0 if self.own_only else max(0, total - free - self.alloc.reserved())

    def peak(self) -> int:
        if self.alloc is None:
            return 0
        self.alloc.synchronize()
        free, total = self.alloc.mem_get_info()
        outside = 0 if self.own_only else max(self.outside, total - free - self.alloc.reserved())  # NCCL, tenants
        return self.alloc.max_reserved() + outside + self.extra
