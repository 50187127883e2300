"""The largest micro-batch that trains safely on every rank, and what to do when memory still runs out.

Before training, every training rank probes the *real* step (forward, backward,
optimizer step so its state exists, GradScaler, the EMA update on rank 0) at
growing micro-batches, then bisects between the last fit and the first failure.
A size fits when it ran without an out-of-memory error and its peak (allocator
reserved peak + memory used outside the allocator) stays under
`autobatch.fraction` of the device. Ranks take the MIN, so mixed GPUs or another
tenant on one GPU cannot make one rank OOM later. The per-rank step batch (the
samples of one optimizer step) is fixed first; the micro-batch only decides how
it is cut, so accumulation absorbs every change and the effective batch, the LR
schedule and the results stay what the user asked for.

During training every forward and backward of a micro-batch ends with a tiny
CPU all-reduce of "did anyone OOM" (gloo, no device sync). If anyone did, every
rank drops the step's gradients and redoes the same step batch with half the
micro-batch. Gradients are all-reduced by us after that last agreement, never
inside backward: an OOM in one rank's backward would otherwise leave the other
ranks waiting in DDP's all-reduce forever (Composer's known hole).

On CPU there is no memory to probe: `batch.size=auto` uses the job's default,
unless `debug.simulate_oom_above` is set, which makes forward raise a real
`torch.OutOfMemoryError` above a size, and then all of the above runs as on a GPU.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import random
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from launcher.files import read_json, write_json
from launcher.schema import Config, ConfigError

log = logging.getLogger(__name__)

# The message forms an allocation failure takes when it is not a torch.OutOfMemoryError.
OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_SUPPORTED", "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",
                "unable to find an engine", "DefaultCPUAllocator: can't allocate memory",
                "HIP out of memory")


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES)


class OutOfMemory(RuntimeError):
    """No micro-batch fits, or runtime recovery gave up: a clear end instead of a hang."""


def cleanup(device: torch.device) -> None:
    """After an OOM: collect the dropped graph, hand cached blocks back so the next try starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Simulated memory limits (debug.simulate_oom_above / simulate_oom_at_step): real exceptions.

def simulated_limit(value: Any, rank: int) -> Optional[int]:
    """debug.simulate_oom_above for this rank: an int for all, or a list indexed by rank."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    values = list(value)
    return int(values[rank % len(values)])


def simulate_oom_above(model: nn.Module, limit: Optional[int]):
    """Forward raises a real torch.OutOfMemoryError when the micro-batch is larger than `limit`;
    returns the hook's handle (None without a limit)."""
    if limit is None:
        return None

    def hook(_module, args):
        if args and torch.is_tensor(args[0]) and len(args[0]) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: micro-batch {len(args[0])} > "
                                         f"debug.simulate_oom_above={limit})")
    return model.register_forward_pre_hook(hook)


# ---------------------------------------------------------------------------------------------
# Batch geometry.

@dataclass
class Batch:
    """`step` samples per rank per optimizer step, fixed for the run; cut into micro-batches of `micro`."""
    micro: int
    step: int
    world: int

    @property
    def accum(self) -> int:
        return -(-self.step // self.micro)

    @property
    def global_size(self) -> int:
        return self.step * self.world


def geometry(found: int, global_size: Optional[int], world: int) -> Batch:
    """From the largest safe micro-batch: with batch.global_size the step batch is fixed by it and the
    micro-batch becomes the most even cut of it that fits; without, the step batch is one micro-batch."""
    if global_size is None:
        return Batch(found, found, world)
    step = global_size // world
    accum = -(-step // found)
    return Batch(-(-step // accum), step, world)


# ---------------------------------------------------------------------------------------------
# The probe.

@dataclass
class Probe:
    size: int
    ok: bool  # ran without an out-of-memory error
    fits: bool  # ok and under the memory limit
    peak_bytes: int  # reserved peak + outside the allocator + extra (0 where not measurable)
    seconds: float
    error: str = ""


@dataclass
class Search:
    found: int  # largest size that fits, after the margin where memory is not measured (0: none)
    largest_ok: int
    limit_bytes: Optional[int]
    probes: List[Probe] = field(default_factory=list)
    seconds: float = 0.0


class DeviceMemory:
    """Peak memory of one trial: the caching allocator's reserved peak plus what the device uses
    outside it (CUDA context, NCCL, other processes: cudaMemGetInfo, the figure NVML reports)."""

    def __init__(self, device: torch.device, fraction: float, extra_bytes: int = 0):
        self.device, self.extra = device, extra_bytes
        self.cuda = device.type == "cuda"
        self.total = torch.cuda.mem_get_info(device)[1] if self.cuda else 0
        self.limit = int(fraction * self.total) if self.cuda else None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        outside = max(0, total - free - torch.cuda.memory_reserved(self.device))
        return torch.cuda.max_memory_reserved(self.device) + outside + self.extra


def search(trial: Callable[[int], None], start: int, cap: int, max_probes: int, memory: DeviceMemory,
           margin: float) -> Search:
    """Grow x2 from `start` (down by halves if it fails), jump to a linear fit of peak memory once two
    sizes fit, then bisect between the largest fit and the smallest failure until they are within
    margin/2 of each other or the probe budget is spent."""
    t0 = time.perf_counter()
    out = Search(0, 0, memory.limit)
    lo, hi = 0, cap + 1  # largest fit, smallest failure
    n = max(1, min(start, cap))
    while len(out.probes) < max_probes:
        out.probes.append(_run(trial, n, memory))
        p = out.probes[-1]
        if p.ok:
            out.largest_ok = max(out.largest_ok, n)
        lo, hi = (max(lo, n), hi) if p.fits else (lo, min(hi, n))
        if lo >= cap or hi - lo <= max(1, int(lo * margin / 2)) or hi == 1:
            break
        if lo == 0:
            n = hi // 2
        else:
            guess = _fit(out.probes, memory.limit)
            if guess is None:
                n = 2 * lo if hi > cap else (lo + hi) // 2
            else:  # memory is linear in the batch: go straight to the limit, then verify
                n = guess if guess > lo else lo + max(1, int(lo * margin / 4))
            n = max(lo + 1, min(n, hi - 1, cap))
    found = lo if memory.limit is not None else int(lo * (1.0 - margin))
    out.found, out.seconds = max(found, 1) if lo else 0, time.perf_counter() - t0
    return out


def _run(trial: Callable[[int], None], n: int, memory: DeviceMemory) -> Probe:
    memory.start()
    t0 = time.perf_counter()
    try:
        trial(n)
        ok, error = True, ""
    except Exception as e:  # noqa: BLE001 - only OOMs are expected; everything else is re-raised
        if not is_oom(e):
            raise
        traceback.clear_frames(e.__traceback__)
        ok, error = False, str(e).splitlines()[0][:160]
    peak = memory.peak()
    if not ok:  # a success frees everything by reference counting; a failure may leave cycles
        cleanup(memory.device)
    fits = ok and (memory.limit is None or peak <= memory.limit)
    p = Probe(n, ok, fits, int(peak), round(time.perf_counter() - t0, 4), error)
    log.info("autobatch probe: micro-batch %d %s, peak %.2f GiB%s, %.2fs", n, "ok" if ok else "OOM",
             peak / 2**30, "" if memory.limit is None else f" (limit {memory.limit / 2**30:.2f})", p.seconds)
    return p


def _fit(probes: List[Probe], limit: Optional[int]) -> Optional[int]:
    """Size at which a line through the fitting probes' peaks reaches `limit` (None: cannot tell)."""
    pts = sorted({p.size: p.peak_bytes for p in probes if p.ok and p.peak_bytes}.items())
    if limit is None or len(pts) < 2:
        return None
    slope, intercept = np.polyfit([s for s, _ in pts], [m for _, m in pts], 1)
    if slope <= 0:
        return None
    return int((limit - intercept) / slope)


# ---------------------------------------------------------------------------------------------
# Trials: one real step at size n.

def repeat_sample(dataset, n: int, device: torch.device):
    """n copies of the first sample: the probe needs the shape, not the data."""
    x, y = dataset[0]
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    return (x.unsqueeze(0).expand(n, *x.shape).contiguous().to(device),
            y.unsqueeze(0).expand(n, *y.shape).contiguous().to(device))


def probe_batch(job, dataset, n: int, device: torch.device):
    """The job's largest input at size n: `job.probe_batch(n, device)` if it has one, else the first sample."""
    if hasattr(job, "probe_batch"):
        return job.probe_batch(n, device)
    return repeat_sample(dataset, n, device)


def train_trial(model: nn.Module, job, dataset, device: torch.device, amp: Callable[[], Any],
                make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], fp16: bool,
                make_ema: Optional[Callable[[nn.Module], Any]]) -> Callable[[int], None]:
    """One full training step at size n, with a throwaway optimizer, scaler and EMA so their
    memory is counted; the caller restores the weights and RNG afterwards."""
    def trial(n: int) -> None:
        opt = make_optimizer(model)
        scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        ema = make_ema(model) if make_ema else None
        x, y = probe_batch(job, dataset, n, device)
        try:
            for _ in range(2):  # the second step runs with the optimizer state already allocated
                with amp():
                    loss = job.loss(model(x), y)
                scaler.scale(loss).backward()
                del loss
                scaler.step(opt)
                scaler.update()
                if ema is not None:
                    ema.update(model)
                opt.zero_grad(set_to_none=True)
        finally:
            for p in model.parameters():
                p.grad = None
    return trial


def eval_trial(model: nn.Module, job, dataset, device: torch.device, amp: Callable[[], Any]
               ) -> Callable[[int], None]:
    @torch.no_grad()
    def trial(n: int) -> None:
        x, y = probe_batch(job, dataset, n, device)
        with amp():
            job.metrics(model(x), y)
    return trial


class Snapshot:
    """Weights (to host) and every RNG, so the run after probing is the run that started with the choice."""

    def __init__(self, model: nn.Module):
        self.model, self.training = model, model.training
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def restore(self) -> None:
        self.model.load_state_dict(self.state)
        self.model.train(self.training)
        random.setstate(self.rng[0])
        np.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])
        if self.rng[3] is not None:
            torch.cuda.set_rng_state_all(self.rng[3])


def probe_eval_batch(model: nn.Module, job, dataset, device: torch.device, cfg_autobatch, start: int,
                     amp: Callable[[], Any] = nullcontext, simulate: Optional[int] = None) -> Search:
    """The validator's own batch (`validation.batch_size=auto`): forward only, no gradients, eval mode.
    `simulate` is the validator's debug.simulate_oom_above; on CPU without it, `start` is returned."""
    memory = DeviceMemory(device, cfg_autobatch.fraction)
    if memory.limit is None and simulate is None:
        return Search(start, start, None)
    snap = Snapshot(model)
    model.eval()
    handle = simulate_oom_above(model, simulate)
    try:
        return search(eval_trial(model, job, dataset, device, amp), start, cfg_autobatch.max,
                      cfg_autobatch.max_probes, memory, cfg_autobatch.margin)
    finally:
        if handle is not None:
            handle.remove()
        snap.restore()


# ---------------------------------------------------------------------------------------------
# Choosing the training micro-batch, agreed by every training rank, cached in autobatch.json.

def _signature(cfg: Config, device: torch.device, precision: str) -> dict:
    """What the choice depends on: a resume with the same signature reuses it."""
    dev = f"{torch.cuda.get_device_name(device)} {torch.cuda.mem_get_info(device)[1]}" \
        if device.type == "cuda" else "cpu"
    job = hashlib.sha1(repr(cfg.job).encode()).hexdigest()[:12]
    return {"device": dev, "batch_size": cfg.batch.size, "global_size": cfg.batch.global_size,
            "precision": precision, "job": job, "simulate_oom_above": repr(cfg.debug.simulate_oom_above),
            "fraction": cfg.autobatch.fraction, "margin": cfg.autobatch.margin}


def choose(cfg: Config, env, dist, run_dir: Path, model: nn.Module, job, dataset, precision: str,
           amp: Callable[[], Any], make_optimizer, make_ema) -> tuple[Batch, dict]:
    """The run's batch geometry and the `autobatch` event. Every training rank calls this."""
    device, world = env.device, env.train_world
    limit = simulated_limit(cfg.debug.simulate_oom_above, env.train_rank)
    simulate_oom_above(model, limit)
    sig = dist.all_gather_object(_signature(cfg, device, precision))
    path = run_dir / "autobatch.json"
    cached = read_json(path) if env.is_main and path.exists() else None
    cached = dist.broadcast_train(cached if cached and cached.get("signature") == sig else None)
    if cached:  # a resume: the same devices and settings, and any runtime reduction, kept
        batch = Batch(cached["micro_batch"], cached["step_batch"], world)
        return batch, {"cached": True, "micro_batch": batch.micro, "accum": batch.accum,
                       "global_batch": batch.global_size}
    record = {"signature": sig, "requested": cfg.batch.size, "global_size": cfg.batch.global_size,
              "train_world": world, "oom_retries": []}
    if cfg.batch.size != "auto":
        found = int(cfg.batch.size)
        batch = Batch(found, found * batch_geometry(cfg, found, world)[0], world)
        record.update(reason="fixed")
    elif device.type != "cuda" and limit is None:
        found = job.cfg.batch_size
        batch = geometry(found, cfg.batch.global_size, world)
        record.update(reason=f"no device memory to probe on {device.type}: the job's default micro-batch")
        log.info("batch.size=auto on %s: no memory to probe, using the job's default micro-batch %d",
                 device.type, found)
    else:
        # Not in the trial step but on the device during training: DDP's gradient buckets (a copy of the
        # gradients) and, with inline validation, rank 0's evaluation copy of the model.
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        copies = (world > 1) + (env.is_main and cfg.validation.mode == "inline")
        memory = DeviceMemory(device, cfg.autobatch.fraction, copies * weights)
        snap = Snapshot(model)
        start = min(job.cfg.batch_size, cfg.batch.global_size // world if cfg.batch.global_size else cfg.autobatch.max)
        try:
            mine = search(train_trial(model, job, dataset, device, amp, make_optimizer, precision == "fp16",
                                      make_ema if env.is_main else None),
                          start, cfg.autobatch.max, cfg.autobatch.max_probes, memory, cfg.autobatch.margin)
        finally:
            snap.restore()
            cleanup(device)
        per_rank = dist.all_gather_object({"rank": env.train_rank, "found": mine.found,
                                           "largest_ok": mine.largest_ok, "limit_bytes": mine.limit_bytes,
                                           "seconds": round(mine.seconds, 3),
                                           "probes": [asdict(p) for p in mine.probes]})
        found = min(r["found"] for r in per_rank)  # same on every rank: gathered from all
        if found == 0:
            worst = [r["rank"] for r in per_rank if r["found"] == 0]
            raise OutOfMemory(f"batch.size=auto: not even a micro-batch of 1 trains on training rank(s) {worst} "
                              f"of device {sig[worst[0]]['device']}; use a smaller model or more memory")
        batch = geometry(found, cfg.batch.global_size, world)
        record.update(reason="probed", found=found, per_rank=per_rank,
                      probes=max(len(r["probes"]) for r in per_rank),
                      seconds=max(r["seconds"] for r in per_rank))
        log.info("autobatch: micro-batch %d on this rank (%d probes, %.1fs); all ranks agree on %d",
                 mine.found, len(mine.probes), mine.seconds, found)
    record.update(micro_batch=batch.micro, step_batch=batch.step, accum=batch.accum,
                  global_batch=batch.global_size)
    if env.is_main:
        write_json(path, record)
    event = {k: record[k] for k in ("reason", "micro_batch", "accum", "global_batch", "found", "probes",
                                    "seconds") if k in record}
    if "per_rank" in record:  # the curve: [size, peak bytes, ok, seconds] per probe, per rank
        event["curve"] = [[[p["size"], p["peak_bytes"], p["ok"], p["seconds"]] for p in r["probes"]]
                          for r in record["per_rank"]]
    return batch, {"cached": False, **event}


def batch_geometry(cfg: Config, micro: int, world: int) -> tuple[int, int]:
    """(accumulation steps, global batch) for a user-given micro-batch; exact or a ConfigError."""
    if cfg.batch.global_size is None:
        return 1, micro * world
    per_step = micro * world
    if cfg.batch.global_size % per_step:
        raise ConfigError(f"batch.global_size={cfg.batch.global_size} is not a multiple of batch.size x "
                          f"training ranks = {micro} x {world}; choose a multiple of {per_step}")
    return cfg.batch.global_size // per_step, cfg.batch.global_size


# ---------------------------------------------------------------------------------------------
# Runtime recovery.

class StepOOM(Exception):
    """Some training rank ran out of memory in this step; every rank raises it at the same point."""

    def __init__(self, phase: str, ranks: List[int]):
        super().__init__(f"out of memory in {phase} on training rank(s) {ranks}")
        self.phase, self.ranks = phase, ranks


class Recovery:
    """Agreement after every forward and backward, gradient sync after the last one, and the policy:
    halve the micro-batch, redo the step, at most `autobatch.max_retries` times.

    With `autobatch.max_retries=0` it steps aside: no agreement, DDP's own overlapped gradient sync.
    The GradScaler needs no reset: an OOM in forward or backward comes before unscale_/step, so the
    scaler has recorded nothing for this step. Not covered: an OOM in the optimizer step or in our
    gradient all-reduce (the probe ran both); a non-OOM error ends that rank and torchrun the others."""

    def __init__(self, cfg: Config, env, dist, run_dir: Path, model: nn.Module, tel):
        self.enabled = cfg.autobatch.max_retries > 0
        self.max_retries, self.retries = cfg.autobatch.max_retries, 0
        self.env, self.dist, self.run_dir, self.model, self.tel = env, dist, run_dir, model, tel
        self.device = env.device
        self.manual_sync = self.enabled and dist.distributed_training
        self.agreements = 0
        self.at_step = cfg.debug.simulate_oom_at_step
        self._step = -1
        if self.at_step is not None and self.enabled:
            model.register_full_backward_pre_hook(self._simulated_backward_oom)

    # -- the loop's three calls ---------------------------------------------------------------
    def forward(self, step: int) -> "_Guard":
        self._step = step
        return _Guard(self, "forward") if self.enabled else nullcontext()

    def backward(self, step: int) -> "_Guard":
        return _Guard(self, "backward") if self.enabled else nullcontext()

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
        for flat, tensors in _coalesce([p.grad for p in params]):
            tdist.all_reduce(flat, group=group)
            flat.div_(world)
            _scatter(flat, tensors)
        buffers = [b for b in self.model.buffers()]
        for flat, tensors in _coalesce(buffers):
            tdist.broadcast(flat, src=self.env.train_ranks[0], group=group)
            _scatter(flat, tensors)

    def recover(self, batch: Batch, e: StepOOM, step: int) -> None:
        """After every rank dropped the step's graph and gradients: halve, log, or give up clearly."""
        cleanup(self.device)
        if batch.micro == 1 or self.retries >= self.max_retries:
            why = "at micro-batch 1" if batch.micro == 1 else f"after autobatch.max_retries={self.max_retries}"
            msg = (f"{e} at step {step + 1} with micro-batch {batch.micro}: giving up {why}; "
                   "lower batch.size, use a smaller model or free device memory")
            log.error(msg)
            self.tel.event("oom_giveup", step=step, phase=e.phase, ranks=e.ranks, micro_batch=batch.micro)
            raise OutOfMemory(msg) from None
        self.retries += 1
        before = batch.micro
        batch.micro = -(-batch.micro // 2)
        log.warning("%s at step %d: redoing it with micro-batch %d -> %d, accumulation %d (same %d samples)",
                    e, step + 1, before, batch.micro, batch.accum, batch.step)
        self.tel.event("oom_retry", step=step, phase=e.phase, ranks=e.ranks, micro_from=before,
                       micro_to=batch.micro, accum=batch.accum, step_batch=batch.step, retry=self.retries)
        path = self.run_dir / "autobatch.json"
        if self.env.is_main and path.exists():  # a resume continues with the reduced micro-batch
            record = read_json(path)
            record["oom_retries"].append({"step": step, "phase": e.phase, "ranks": e.ranks,
                                          "micro_from": before, "micro_to": batch.micro})
            record.update(micro_batch=batch.micro, accum=batch.accum)
            write_json(path, record)

    # -- internals ----------------------------------------------------------------------------
    def agree(self, phase: str, failed: bool) -> None:
        """All-reduce a one-hot "I ran out of memory" over the training group (a CPU tensor: gloo)."""
        self.agreements += 1
        flags = torch.zeros(self.env.train_world)
        flags[max(self.env.train_rank, 0)] = float(failed)
        if self.dist.distributed_training:
            tdist.all_reduce(flags, group=self.dist.group)
        ranks = [int(r) for r in torch.nonzero(flags).flatten()]
        if ranks:
            raise StepOOM(phase, ranks)

    def _simulated_backward_oom(self, _module, _grad):
        if self._step + 1 == self.at_step and self.env.train_rank == self.env.train_world - 1:
            self.at_step = None  # once
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated in backward: "
                                         f"debug.simulate_oom_at_step={self._step + 1})")


class _Guard:
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


def _coalesce(tensors: List[torch.Tensor], bucket_bytes: int = 25 << 20):
    """(flat buffer, tensors) buckets of one dtype and device, about `bucket_bytes` each."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket, size = [], 0
        for t in group:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                yield torch.cat([b.reshape(-1) for b in bucket]), bucket
                bucket, size = [], 0
        if bucket:
            yield torch.cat([b.reshape(-1) for b in bucket]), bucket


def _scatter(flat: torch.Tensor, tensors: List[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
