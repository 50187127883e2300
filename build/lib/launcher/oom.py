"""Out-of-memory errors at run time: recognise them, agree on them, redo the step with less.

Every forward and backward of a micro-batch ends with a tiny CPU all-reduce of "did
anyone OOM" (gloo, no device sync). If anyone did, every rank drops the step's
gradients and redoes the same step batch with half the micro-batch. Gradients are
all-reduced by us after that last agreement, never inside backward: an OOM in one
rank's backward would otherwise leave the other ranks waiting in DDP's all-reduce
forever (Composer's known hole). With `autobatch.max_retries=0` all of this steps
aside and DDP syncs inside backward as usual.
"""
from __future__ import annotations

import gc
import logging
import traceback
from contextlib import nullcontext
from typing import List

import torch
import torch.distributed as tdist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from launcher.batch import Batch

log = logging.getLogger(__name__)

# The message forms a failed *allocation* takes when it is not a torch.OutOfMemoryError: the CUDA/HIP
# caching allocator, a raw cudaMalloc inside a kernel launch, cuBLAS/cuDNN workspace allocations, the CPU
# allocator. Errors that merely mention a missing kernel (CUDNN_STATUS_NOT_SUPPORTED, "unable to find an
# engine") are not out-of-memory errors: treating them as one hides real bugs behind a halved batch.
OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_ALLOC_FAILED", "DefaultCPUAllocator: can't allocate memory", "HIP out of memory",
                "hipErrorOutOfMemory")


def is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError, or a RuntimeError carrying one of the allocation-failure messages."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES)


class OutOfMemory(RuntimeError):
    """No micro-batch fits, or runtime recovery gave up: a clear end instead of a hang."""


class StepOOM(Exception):
    """Some training rank ran out of memory in this step; every rank raises it at the same point."""

    def __init__(self, phase: str, ranks: List[int]):
        super().__init__(f"out of memory in {phase} on training rank(s) {ranks}")
        self.phase, self.ranks = phase, ranks


def cleanup(device: torch.device) -> None:
    """After an OOM: collect the dropped graph, hand cached blocks back so the next try starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Recovery:
    """Agreement after every forward and backward, gradient sync after the last one, and the policy:
    halve the micro-batch, redo the step, at most `autobatch.max_retries` times.

    The GradScaler needs no reset: an OOM in forward or backward comes before unscale_/step, so the
    scaler has recorded nothing for this step. Not covered: an OOM in the optimizer step or in our
    gradient all-reduce (the probe ran both); a non-OOM error ends that rank and torchrun the others."""

    def __init__(self, cfg, env, dist, rundir, model: nn.Module, tel):
        self.enabled = cfg.autobatch.max_retries > 0
        self.max_retries, self.retries = cfg.autobatch.max_retries, 0
        self.env, self.dist, self.rundir, self.model, self.tel = env, dist, rundir, model, tel
        self.manual_sync = self.enabled and dist.distributed_training

    def forward(self):
        return _Agree(self, "forward") if self.enabled else nullcontext()

    def backward(self):
        return _Agree(self, "backward") if self.enabled else nullcontext()

    def no_sync(self, ddp: nn.Module, last: bool):
        """DDP syncs in backward only on the last micro-batch, and never when we sync ourselves."""
        if ddp is self.model or (last and not self.manual_sync):
            return nullcontext()
        return ddp.no_sync()

    def all_reduce_grads(self) -> None:
        """Average gradients across training ranks, then take rank 0's buffers (as DDP's
        broadcast_buffers would before the next forward). Only when every rank's backward is done."""
        if not self.manual_sync:
            return
        group, world = self.dist.group, self.env.train_world
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for grads in _buckets([p.grad for p in params]):
            flat = _flatten_dense_tensors(grads)
            tdist.all_reduce(flat, group=group)
            flat.div_(world)
            torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))
        for buffers in _buckets(list(self.model.buffers())):
            flat = _flatten_dense_tensors(buffers)
            tdist.broadcast(flat, src=self.env.train_ranks[0], group=group)
            torch._foreach_copy_(buffers, _unflatten_dense_tensors(flat, buffers))

    def recover(self, batch: Batch, e: StepOOM, step: int) -> Batch:
        """After every rank dropped the step's graph and gradients: the halved batch, or give up clearly."""
        cleanup(self.env.device)
        if batch.micro == 1 or self.retries >= self.max_retries:
            why = "at micro-batch 1" if batch.micro == 1 else f"after autobatch.max_retries={self.max_retries}"
            msg = (f"{e} at step {step + 1} with micro-batch {batch.micro}: giving up {why}; "
                   "lower batch.size, use a smaller model or free device memory")
            log.error(msg)
            self.tel.event("oom_giveup", step=step, phase=e.phase, ranks=e.ranks, micro_batch=batch.micro)
            raise OutOfMemory(msg) from None
        self.retries += 1
        smaller = batch.halved()
        log.warning("%s at step %d: redoing it with micro-batch %d -> %d, accumulation %d (same %d samples)",
                    e, step + 1, batch.micro, smaller.micro, smaller.accum, smaller.step)
        self.tel.event("oom_retry", step=step, phase=e.phase, ranks=e.ranks, micro_from=batch.micro,
                       micro_to=smaller.micro, accum=smaller.accum, step_batch=smaller.step, retry=self.retries)
        record = self.rundir.read_autobatch() if self.env.is_main else None
        if record is not None:  # a resume continues with the reduced micro-batch
            record.oom_retries.append({"step": step, "phase": e.phase, "ranks": e.ranks,
                                       "micro_from": batch.micro, "micro_to": smaller.micro})
            record.micro_batch, record.accum = smaller.micro, smaller.accum
            self.rundir.write_autobatch(record)
        return smaller

    def agree(self, phase: str, failed: bool) -> None:
        """All-reduce a one-hot "I ran out of memory" over the training group (a CPU tensor: gloo)."""
        flags = torch.zeros(self.env.train_world)
        flags[max(self.env.train_rank, 0)] = float(failed)
        if self.dist.distributed_training:
            tdist.all_reduce(flags, group=self.dist.group)
        ranks = [int(r) for r in torch.nonzero(flags).flatten()]
        if ranks:
            raise StepOOM(phase, ranks)


class _Agree:
    """Catches an OOM in its block, then agrees with every other rank; raises StepOOM on all if any."""

    def __init__(self, rec: Recovery, phase: str):
        self.rec, self.phase = rec, phase

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is not None and not is_oom(exc):
            return False
        if exc is not None:
            log.warning("out of memory in %s on this rank: %s", self.phase, str(exc).splitlines()[0][:200])
            traceback.clear_frames(tb)  # the failed frames hold activations
        self.rec.agree(self.phase, exc is not None)
        return False


def _buckets(tensors: List[torch.Tensor], bucket_bytes: int = 25 << 20):
    """Lists of tensors of one dtype and device, about `bucket_bytes` each."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket, size = [], 0
        for t in group:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket
