"""The checkpointer's worker: one daemon thread that runs jobs one at a time, in order.

A thread, not a process: its jobs spend their time in calls that release the GIL (file writes,
sha256 of large buffers, torch.save's storage records, gloo collectives), so it does not fight the
training thread for it (benchmarks/checkpoint.py measures the stall), it needs no shared memory or
second CUDA context, and it dies with the process, so a killed trainer leaves no writer behind to
commit a checkpoint later. A daemon: a writer stuck in a collective with a dead peer never keeps the
process from exiting once `close()` has waited its bounded time.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, Optional

import torch


class Background:
    """`device`: the thread's CUDA calls (pinning, DCP's loader) go to this rank's GPU, not to GPU 0."""

    def __init__(self, device: Optional[torch.device] = None, name: str = "checkpoint-writer"):
        self.device = device
        self.jobs: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], object]) -> Future:
        future: Future = Future()
        self.jobs.put((fn, future))
        return future

    def _run(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while (job := self.jobs.get()) is not None:
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the caller reads it from the future
                    future.set_exception(e)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Let the queued jobs finish (at most `timeout` seconds); True if the thread ended."""
        self.jobs.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()
