"""A caching allocator modelled on the CPU, for the batch probe's tests and benchmarks/autobatch.py.

Freed blocks stay cached (reserved) and are reused only by a request of their size, a failed
reservation first releases the cache and retries (as the real allocator does), and
`empty_cache()` hands the cache back. A probe that reads stale cache on a GPU reads it here too.
It offers the calls launcher.batch.memory.DeviceMemory reads (`allocator=`).
"""
from __future__ import annotations

from collections import Counter
from typing import List, Tuple

import torch


class SimulatedDevice:
    """A caching allocator on a device of `total` bytes, of which `capacity` can be reserved.

    `step(n)` is one training step at micro-batch n: the persistent step state (optimizer
    moments, EMA: `fixed` bytes, the same blocks every time) and `layers` activation blocks
    of `per_sample * n / layers` bytes each; it raises a real torch.OutOfMemoryError when
    the device cannot hold them. `weights` bytes stay allocated throughout."""

    def __init__(self, total: int, capacity: float = 0.97, weights: int = 0, fixed: int = 0,
                 per_sample: float = 0.0, layers: int = 8):
        self.total, self.capacity = int(total), int(capacity * total)
        self.fixed, self.per_sample, self.layers = int(fixed), float(per_sample), layers
        self.cache: Counter = Counter()  # block size -> free cached blocks
        self.in_use = self._reserved = self.peak_reserved = 0
        self.steps = 0
        if weights:
            self.malloc(int(weights))

    # ---- the allocator
    def malloc(self, size: int) -> int:
        if self.cache[size]:
            self.cache[size] -= 1
        else:
            if self._reserved + size > self.capacity:
                self.empty_cache()  # what the real allocator does before giving up
            if self._reserved + size > self.capacity:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {size / 2**30:.2f} GiB (simulated device: "
                    f"{self.in_use / 2**30:.2f} GiB allocated, capacity {self.capacity / 2**30:.2f} GiB)")
            self._reserved += size
        self.in_use += size
        self.peak_reserved = max(self.peak_reserved, self._reserved)
        return size

    def free(self, size: int) -> None:
        self.in_use -= size
        self.cache[size] += 1  # stays reserved until empty_cache()

    def step(self, n: int) -> None:
        self.steps += 1
        held: List[int] = []
        try:
            if self.fixed:
                held.append(self.malloc(self.fixed))
            for _ in range(self.layers):
                held.append(self.malloc(int(self.per_sample * n / self.layers)))
        finally:
            for size in held:
                self.free(size)

    def fits(self, n: int) -> bool:
        """Whether a step at n runs (on an empty cache): the ground truth for tests."""
        need = self.fixed + self.layers * int(self.per_sample * n / self.layers)
        return self.in_use + need <= self.capacity

    # ---- what DeviceMemory reads
    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        self._reserved -= sum(size * k for size, k in self.cache.items())
        self.cache.clear()

    def reset_peak(self) -> None:
        self.peak_reserved = self._reserved

    def reserved(self) -> int:
        return self._reserved

    def max_reserved(self) -> int:
        return self.peak_reserved

    def mem_get_info(self) -> Tuple[int, int]:
        return self.total - self._reserved, self.total
