"""Out-of-memory errors at run time: recognise them, agree once per step, redo the step with less.

With 2+ training ranks DDP keeps its overlapped, bucketed all-reduce: every micro-batch but
the last runs under `no_sync` (distributed/wrap.GradSync), so its forward and backward run no
collective, and an OOM there is caught on that rank alone (it skips its remaining
micro-batches). After the last forward and before the last backward, the only backward that
runs DDP's collectives, the ranks agree once (the step's Agreement, distributed/agreement.py: a
tiny CPU all-reduce, gloo, no device sync) on "I ran out of memory in <phase>" or "I would: my
free memory (host-side allocator counters) is below the backward headroom the probe measured".
If any rank says so, every rank drops the step's gradients and redoes the same samples with half
the micro-batch.

An OOM *inside* the last backward cannot be agreed on: the other ranks are in DDP's
all-reduce. That rank writes the halved micro-batch to autobatch.json (rank 0 may be the one
waiting) and exits with status 75 (EXIT_RESTART, EX_TEMPFAIL); torchrun tears the group down
(the others' all-reduce fails or they are stopped) and `--max-restarts` (or a Slurm requeue)
resumes from the last checkpoint with the halved micro-batch. With one training rank every
phase is local, the last backward included, so everything is redone in place.
`autobatch.max_retries=0` turns all of this off.

Under fsdp the same holds because every rank all-gathers the step's parameters up front, before
anything that can run out of memory (fsdp.unshard_for_step), and keeps them until the last
backward, whose reduce-scatters are the step's only other collectives. An OOM inside that first
all-gather is treated like one inside the last backward (exit 75). With recovery off, fsdp runs its
usual step (each block gathered for its forward and resharded after it: less memory).
"""
from __future__ import annotations

import gc
import logging
import traceback
from contextlib import nullcontext
from typing import Callable, List, Optional

import torch

from launcher.batch.geometry import Batch
from launcher.config.schema import AutobatchConfig
from launcher.distributed.agreement import Agreement
from launcher.distributed.wrap import GradSync
from launcher.errors import EXIT_RESTART, OutOfMemory
from launcher.rundir import AutobatchRecord
from launcher.telemetry.off import OFF

log = logging.getLogger(__name__)

# The message forms a failed *allocation* takes when it is not a torch.OutOfMemoryError: the CUDA/HIP
# caching allocator, a raw cudaMalloc inside a kernel launch, cuBLAS/cuDNN workspace allocations, the CPU
# allocator. Errors that merely mention a missing kernel (CUDNN_STATUS_NOT_SUPPORTED, "unable to find an
# engine") are not out-of-memory errors: treating them as one hides real bugs behind a halved batch.
OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_ALLOC_FAILED", "DefaultCPUAllocator: can't allocate memory", "HIP out of memory",
                "hipErrorOutOfMemory")
# What a rank reports in the step's agreement (index + 1; 0 = fine). "headroom": it would run out in the last
# backward; "unshard": fsdp's up-front all-gather failed (the probe).
PHASES = ("forward", "backward", "last backward", "headroom", "unshard")


def is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError, or a RuntimeError carrying one of the allocation-failure messages."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES)


class StepOOM(Exception):
    """Some training rank ran out of memory in this step (or would); every rank raises it at the same point."""

    def __init__(self, phase: str, ranks: List[int]):
        super().__init__(f"out of memory in {phase} on training rank(s) {ranks}")
        self.phase, self.ranks = phase, ranks


def cleanup(device: torch.device) -> None:
    """After an OOM: collect the dropped graph, hand cached blocks back so the next try starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Headroom:
    """Whether this rank has the memory its last backward needs, from host-side figures only: the device's
    total and what lies outside PyTorch's allocator (read once), what the allocator has handed out now
    (torch.cuda.memory_allocated: a host counter, no device sync), and the backward headroom the probe
    measured (peak minus allocated after forward, in autobatch.json). `simulate(step)`: debug injection."""

    def __init__(self, device: torch.device, per_rank: Optional[List[Optional[int]]], rank: int,
                 simulate: Callable[[int], bool]):
        need_bytes = per_rank[rank] if per_rank and 0 <= rank < len(per_rank) else None
        self.device, self.need, self.simulate = device, need_bytes, simulate
        self.room = None
        if device.type == "cuda" and need_bytes:
            free, total = torch.cuda.mem_get_info(device)
            self.room = total - max(0, total - free - torch.cuda.memory_reserved(device))

    def short(self, step: int) -> bool:
        if self.simulate(step):
            return True
        return self.room is not None and self.room - torch.cuda.memory_allocated(self.device) < self.need


class Recovery:
    """The run's current micro-batch (`batch`) and its reductions: the policy is to agree once per step,
    halve the micro-batch and redo the step, at most `autobatch.max_retries` times in place; an OOM
    inside the last backward on 2+ ranks ends this attempt with EXIT_RESTART. After the probe wrote its
    choice to autobatch.json (`record`, on every rank), Recovery is the file's one writer: each
    reduction, in place by training rank 0, a restart's by the rank that ran out of memory.

    The GradScaler needs no reset: an OOM in forward or backward comes before unscale_/step, so the
    scaler has recorded nothing for this step. Not covered: an OOM in the optimizer step (the probe ran
    it); a non-OOM error ends that rank and torchrun the others.

    `probe=True` (the batch probe's trial, `for_probe`): no backward synchronizes gradients, so nothing
    collective runs between the agreements, and the one agreement comes after the last backward: an
    OOM anywhere in the trial is agreed on by every rank and fails the trial on all, never leaving a
    collective pending (no restart, no halving). An OOM in fsdp's up-front all-gather is agreed on too
    where the gather itself completed (its copy-out failed); one before a rank issued its all-gather
    leaves the others waiting in it, and ends with the process group aborted (Dist.close)."""

    def __init__(self, cfg: AutobatchConfig, env, rundir, tel, batch: Batch, agreement: Agreement,
                 headroom: "Headroom | None" = None, record: Optional[AutobatchRecord] = None,
                 sharded: bool = False, probe: bool = False):
        self.enabled = probe or cfg.max_retries > 0
        self.max_retries, self.retries, self.probe = cfg.max_retries, 0, probe
        self.env, self.rundir, self.tel = env, rundir, tel
        self.batch, self.record = batch, record
        self.agreement, self.sharded = agreement, sharded
        self.distributed = agreement.distributed
        self.headroom = headroom
        self.phase = ""  # what this rank is doing in the current attempt (faults.py reads it)
        self.allocated_before_backward = 0  # CUDA, probe: what forward left allocated (the backward headroom)

    @classmethod
    def for_probe(cls, env, dist, sharded: bool, n: int) -> "Recovery":
        """The probe's trial at micro-batch n: the unwrapped model on its own (ddp), the sharded one in
        lockstep with every training rank (fsdp), agreeing on nothing but its OOMs."""
        agreement = Agreement(dist, env, distributed=dist.distributed_training and sharded)
        return cls(AutobatchConfig(), env, None, OFF, Batch(n, n, 1), agreement, sharded=sharded, probe=True)

    def attempt(self, step: int, grads: GradSync) -> "_Attempt":
        """One try at the step's forwards and backwards (a context manager); see the module's docstring.
        Under fsdp on 2+ ranks, first the step's all-gathers, on every rank (GradSync.gather); with recovery
        off (autobatch.max_retries=0) FSDP's own step instead: gather per block, reshard after its forward
        (the least memory)."""
        if not self.enabled:
            return _NO_RECOVERY
        attempt = _Attempt(self, step, grads)
        if self.distributed and self.sharded:
            try:
                grads.gather()
            except Exception as e:  # noqa: BLE001 - the others may be inside the all-gather
                if not is_oom(e):
                    raise
                if not self.probe:
                    self.restart(step, "unshard")
                attempt.failed = "unshard"  # the probe: nothing is pending after it, agree at once
        return attempt

    def agree(self, step: int, grads: GradSync, failed: str = "") -> None:
        """The step's one agreement, with this rank's OOM phase in it (1 + its index in PHASES; 0: fine).
        Raises StepOOM on every rank if any rank ran out of memory or would."""
        short = self.headroom is not None and self.headroom.short(step)
        agreed = self.agreement.agree(PHASES.index(failed or "headroom") + 1 if failed or short else 0)
        bad = {r: PHASES[v - 1] for r, v in agreed.oom.items()}
        if bad:
            raise StepOOM(", ".join(sorted(set(bad.values()), key=PHASES.index)), sorted(bad))
        if self.probe:
            grads.stand_in_grads()  # fsdp: no reduce-scatter ran, the optimizer state must still be allocated

    def recover(self, e: StepOOM, step: int, grads: GradSync) -> None:
        """After every rank dropped the step's graph and gradients: halve the batch, or give up clearly.
        fsdp on a torch that cannot reset an aborted step (fsdp.can_reset): a restart instead (exit 75)."""
        if not grads.can_reset():
            self.restart(step, e.phase)
        cleanup(self.env.device)
        grads.reset()
        batch = self.batch
        self._check_can_halve(e.phase, e.ranks, step, str(e))
        self.retries += 1
        self.batch = batch.halved()
        log.warning("%s at step %d: redoing it with micro-batch %d -> %d, accumulation %d (same %d samples)",
                    e, step + 1, batch.micro, self.batch.micro, self.batch.accum, self.batch.step_samples)
        self.tel.event("oom_retry", step=step, phase=e.phase, ranks=e.ranks, micro_from=batch.micro,
                       micro_to=self.batch.micro, accum=self.batch.accum, step_batch=self.batch.step_samples,
                       retry=self.retries)
        if self.record is not None:  # a resume continues with the reduced micro-batch
            self.record = self.record.reduced(step, e.phase, e.ranks, self.batch.micro, self.batch.accum)
            if self.env.is_main:
                self.rundir.write_autobatch(self.record)

    def restart(self, step: int, phase: str = "last backward") -> None:
        """An OOM inside the last backward on 2+ ranks (or in fsdp's all-gather at the step's start): the
        others wait in a collective, so nothing can be agreed. This rank writes the halved micro-batch to
        autobatch.json itself (rank 0 may be the one waiting; no other rank writes it at this point of a
        step), logs an `oom_restart` event (this rank's events; training rank 0 folds them in) and exits
        with EXIT_RESTART; torchrun ends the others, and the restarted group resumes with it."""
        rank, batch = self.env.train_rank, self.batch
        what = f"out of memory in the {phase} on training rank {rank}"
        self._check_can_halve(phase, [rank], step, what, everywhere=False)
        smaller = batch.halved()
        if self.record is not None:
            self.rundir.write_autobatch(self.record.reduced(step, phase, [rank], smaller.micro, smaller.accum,
                                                            restart=True))
        self.rundir.rank_event(self.env.rank, "oom_restart", step=step, rank=rank, phase=phase,
                               micro_from=batch.micro, micro_to=smaller.micro, accum=smaller.accum,
                               exit_code=EXIT_RESTART)
        log.error("%s at step %d: exiting with status %d; torchrun --max-restarts (or a requeue) resumes from "
                  "the last checkpoint with micro-batch %d -> %d, accumulation %d", what, step + 1, EXIT_RESTART,
                  batch.micro, smaller.micro, smaller.accum)
        logging.shutdown()
        raise SystemExit(EXIT_RESTART)

    def _check_can_halve(self, phase: str, ranks: List[int], step: int, what: str, everywhere: bool = True) -> None:
        batch = self.batch
        if batch.micro > 1 and self.retries < self.max_retries:
            return
        why = "at micro-batch 1" if batch.micro == 1 else f"after autobatch.max_retries={self.max_retries}"
        msg = (f"{what} at step {step + 1} with micro-batch {batch.micro}: giving up {why}; "
               "lower batch.size, use a smaller model or free device memory")
        log.error(msg)
        fields = dict(step=step, phase=phase, ranks=ranks, micro_batch=batch.micro)
        if everywhere:
            self.tel.event("oom_giveup", **fields)
        else:
            self.rundir.rank_event(self.env.rank, "oom_giveup", **fields)
        raise OutOfMemory(msg) from None


class Lockstep:
    """fsdp's batch probe: its trial runs collectives, so every training rank runs the same trials.
    Agreements over the training group (CPU tensors, as the step's Agreement)."""

    def __init__(self, dist):
        self.dist = dist

    def all(self, flag: bool) -> bool:
        return not self.dist.any_rank(not flag)

    def min(self, n: int) -> int:
        return int(self.dist.all_reduce(torch.tensor([n], dtype=torch.int64), "min").item())


class _Attempt:
    """Catches an OOM in its block. Before the agreement (a forward, a non-last backward) this rank goes
    straight to the agreement and reports it; after it (the last backward) see Recovery.restart."""

    def __init__(self, rec: Recovery, step: int, grads: GradSync):
        self.rec, self.step, self.grads, self.agreed, self.failed = rec, step, grads, False, ""

    def __enter__(self) -> "_Attempt":
        if self.failed:  # fsdp's up-front all-gather failed (the probe): straight to the agreement
            self.agree()
        return self

    def phase(self, name: str):
        self.rec.phase = name
        if self.rec.probe and name.endswith("backward") and self.rec.env.device.type == "cuda":
            self.rec.allocated_before_backward = torch.cuda.memory_allocated(self.rec.env.device)
        return nullcontext()

    def agree(self) -> None:
        """Before the first backward that synchronizes (the last), or at the end of the trial's backwards
        (the probe): the attempt's one agreement."""
        if not self.agreed:
            self.agreed = True
            self.rec.agree(self.step, self.grads, self.failed)

    def __exit__(self, typ, exc, tb) -> bool:
        phase, self.rec.phase = self.rec.phase, ""
        if exc is None:
            self.agree()
            return False
        if not is_oom(exc):
            return False
        log.warning("out of memory in %s on this rank: %s", phase, str(exc).splitlines()[0][:200])
        traceback.clear_frames(tb)  # the failed frames hold activations
        if self.agreed and self.rec.distributed:
            self.rec.restart(self.step)
        if self.agreed:  # one rank: nothing runs a collective, the agreement is local
            raise StepOOM(phase, [0]) from None
        self.rec.agree(self.step, self.grads, failed=phase)
        return False  # not reached: agree raises StepOOM on every rank


class _NoRecovery:
    """Recovery off (autobatch.max_retries=0): no agreement in the step, an OOM ends the process."""

    def __enter__(self) -> "_NoRecovery":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def phase(self, name: str):
        return nullcontext()

    def agree(self) -> None:
        pass


_NO_RECOVERY = _NoRecovery()
