"""The largest micro-batch that trains safely on every rank, agreed by all, cached in autobatch.json.

Before training, every training rank probes the *real* step (forward, backward,
optimizer step so its state exists, GradScaler, the EMA update where the EMA is kept:
rank 0 under ddp, every rank under fsdp) at
growing micro-batches, then bisects between the last fit and the first failure.
A size fits when it ran without an out-of-memory error and its peak (what the
step reserved, measured on an emptied cache, + memory used outside the allocator +
what training adds beyond the step: DDP buckets, inline validation's copy; see
memory.py) stays under `autobatch.fraction` of the device. Ranks take the MIN, so mixed GPUs or another
tenant on one GPU cannot make one rank OOM later. The micro-batch only decides how
the fixed per-rank step batch is cut (see geometry.py). Under fsdp the probe runs the sharded
step as training does (all-gathers and reduce-scatters measured) in lockstep: every rank
tries the same sizes and a size fits where it fits on all.

On CPU there is no memory to probe: `batch.size=auto` uses the job's default,
unless `debug.simulate_oom_above` is set, which makes forward raise a real
`torch.OutOfMemoryError` above a size, and then all of the above runs as on a GPU.
"""
from __future__ import annotations

import hashlib
import logging
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, List, Optional

import numpy as np
import torch
from torch import nn

from launcher.batch.geometry import Batch, plan, share
from launcher.distributed.env import shares_gpu_with_validator
from launcher.distributed.rng import rng_state, set_rng_state
from launcher.faults import oom_above, simulated_limit
from launcher.distributed.fsdp import default_resharding, is_fsdp, reset_step
from launcher.batch.memory import DeviceMemory
from launcher.batch.recovery import Lockstep, Recovery, StepOOM, cleanup, is_oom
from launcher.errors import OutOfMemory
from launcher.rundir import AutobatchRecord, RunDir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The probe.

@dataclass
class Probe:
    """One trial of the search at `size`: whether it ran and fit, and what it measured."""
    size: int
    ok: bool  # ran without an out-of-memory error
    fits: bool  # ok and under the memory limit
    peak_bytes: int  # reserved peak + outside the allocator + extra (0 where not measurable)
    seconds: float
    error: str = ""
    headroom_bytes: int = 0  # the backward's peak beyond what forward left allocated (CUDA; 0 elsewhere)


@dataclass
class Search:
    """The search's answer on one rank: the largest size that fits, and every probe on the way."""
    found: int  # largest size that fits, after the margin where memory is not measured (0: none)
    largest_ok: int
    limit_bytes: Optional[int]
    probes: List[Probe] = field(default_factory=list)
    seconds: float = 0.0


def search(trial: Callable[[int], None], start: int, cap: int, max_probes: int, memory: DeviceMemory,
           margin: float, lockstep: Optional["Lockstep"] = None) -> Search:
    """Grow x2 from `start` (down by halves if it fails), jump to a linear fit of peak memory once two
    sizes fit, then bisect between the largest fit and the smallest failure until they are within
    margin/2 of each other or the probe budget is spent. With `lockstep` (fsdp: the trial runs
    collectives) every rank tries the same sizes: a size fits only where it fits on all."""
    t0 = time.perf_counter()
    out = Search(0, 0, memory.limit)
    lo, hi = 0, cap + 1  # largest fit, smallest failure
    n = max(1, min(start, cap))
    while len(out.probes) < max_probes:
        out.probes.append(_run(trial, n, memory))
        p = out.probes[-1]
        if lockstep is not None:
            p.fits = lockstep.all(p.fits)
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
            n = lockstep.min(n) if lockstep is not None else n
    found = lo if memory.limit is not None else int(lo * (1.0 - margin))
    out.found, out.seconds = max(found, 1) if lo else 0, time.perf_counter() - t0
    return out


def _run(trial: Callable[[int], None], n: int, memory: DeviceMemory) -> Probe:
    memory.start()
    t0 = time.perf_counter()
    try:
        headroom = trial(n)
        ok, error = True, ""
    except Exception as e:  # noqa: BLE001 - only OOMs (agreed: StepOOM) are expected; the rest is re-raised
        if not (is_oom(e) or isinstance(e, StepOOM)):
            raise
        traceback.clear_frames(e.__traceback__)
        ok, error, headroom = False, str(e).splitlines()[0][:160], 0
    peak = memory.peak()
    if not ok:  # a success frees everything by reference counting; a failure may leave cycles
        cleanup(memory.device)
    fits = ok and (memory.limit is None or peak <= memory.limit)
    p = Probe(n, ok, fits, int(peak), round(time.perf_counter() - t0, 4), error, int(headroom or 0))
    log.info("autobatch probe: micro-batch %d %s, peak %.2f GiB%s, %.2fs", n, "ok" if ok else "OOM",
             peak / 2**30, "" if memory.limit is None else f" (limit {memory.limit / 2**30:.2f})", p.seconds)
    return p


def backward_headroom(probes: List[dict], micro: int) -> Optional[int]:
    """The backward headroom at `micro`, from one rank's probes: measured at the nearest probed size at
    or above it (an upper bound), else scaled from the largest; None where nothing was measured."""
    sized = sorted((p["size"], p.get("headroom_bytes", 0)) for p in probes if p["ok"] and p.get("headroom_bytes"))
    above = [h for size, h in sized if size >= micro]
    if not sized:
        return None
    return above[0] if above else sized[-1][1] * micro // sized[-1][0]


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


def train_trial(trial: Callable[[int, Recovery], None], env, dist, model: nn.Module) -> Callable[[int], int]:
    """The trainer's own step at size n (`trial(n, recovery)`: two optimizer steps with a throwaway
    optimizer, scaler and EMA, so their memory is counted), under a probe Recovery: an OOM anywhere
    in it, on any rank, fails the size on every rank (fsdp: in lockstep, nothing collective left
    pending; fsdp's up-front all-gather failing on any rank ends the probe: OutOfMemory on every rank,
    as the gathered parameters do not depend on n). The caller restores the weights and RNG
    afterwards. Returns the backward headroom on CUDA
    (the peak allocated minus what the last forward left allocated: an upper bound of what a backward
    adds, which recovery.Headroom checks before every last backward), else 0."""
    cuda = env.device.type == "cuda"

    def run(n: int) -> int:
        recovery = Recovery.for_probe(env, dist, is_fsdp(model), n)
        try:
            trial(n, recovery)
        except StepOOM as e:
            if "unshard" in e.phase:  # the parameters gathered whole do not fit, whatever the batch
                raise OutOfMemory(f"batch.size=auto: {e} while gathering the parameters whole for the probe's "
                                  "trial (they do not fit at any micro-batch); use more training ranks or "
                                  "a smaller model") from None
            raise
        finally:
            for p in model.parameters():
                p.grad = None
            if is_fsdp(model):
                reset_step(model)
                default_resharding(model)
        return torch.cuda.max_memory_allocated(env.device) - recovery.allocated_before_backward if cuda else 0
    return run


def eval_trial(model: nn.Module, job, dataset, device: torch.device, amp: Callable[[], Any]
               ) -> Callable[[int], None]:
    @torch.no_grad()
    def trial(n: int) -> None:
        x, y = probe_batch(job, dataset, n, device)
        with amp():
            job.metrics(model(x), y)
    return trial


class Rollback:
    """Weights (to host) and every RNG, so the run after probing is the run that started with the choice."""

    def __init__(self, model: nn.Module, device: Optional[torch.device] = None):
        self.model, self.training, self.device = model, model.training, device
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.rng = rng_state(device)

    def restore(self) -> None:
        self.model.load_state_dict(self.state)
        self.model.train(self.training)
        set_rng_state(self.rng, self.device)


def probe_eval_batch(model: nn.Module, job, dataset, device: torch.device, cfg_autobatch, start: int,
                     amp: Callable[[], Any] = nullcontext, simulate: Optional[int] = None,
                     memory: Optional[DeviceMemory] = None) -> Search:
    """The validator's own batch (`validation.batch_size=auto`): forward only, no gradients, eval mode.
    `simulate` is the validator's debug.simulate_oom_above; on CPU without it, `start` is returned.
    `memory`: a DeviceMemory over another allocator (tests: tests/support/simulated_device.py)."""
    memory = memory or DeviceMemory(device, cfg_autobatch.fraction)
    if memory.limit is None and simulate is None:
        return Search(start, start, None)
    snap = Rollback(model, device)
    model.eval()
    handle = oom_above(model, simulate)
    try:
        return search(eval_trial(model, job, dataset, device, amp), start, cfg_autobatch.max,
                      cfg_autobatch.max_probes, memory, cfg_autobatch.margin)
    finally:
        if handle is not None:
            handle.remove()
        snap.restore()


# ---------------------------------------------------------------------------------------------
# Choosing the training micro-batch, agreed by every training rank, cached in autobatch.json.

def _signature(cfg, device: torch.device, precision: str) -> dict:
    """What the choice depends on: a resume with the same signature reuses it."""
    dev = f"{torch.cuda.get_device_name(device)} {torch.cuda.mem_get_info(device)[1]}" \
        if device.type == "cuda" else "cpu"
    job = hashlib.sha1(repr(cfg.job).encode()).hexdigest()[:12]
    return {"device": dev, "batch_size": cfg.batch.size, "global_size": cfg.batch.global_size,
            "precision": precision, "job": job, "simulate_oom_above": repr(cfg.debug.simulate_oom_above),
            "fraction": cfg.autobatch.fraction, "margin": cfg.autobatch.margin}


@dataclass
class Chosen:
    """The probe's answer: the batch geometry, each training rank's backward headroom (CUDA; else None),
    what to say about it (the `autobatch` event), and the autobatch.json record (on every training rank:
    Recovery writes the reductions into it)."""
    batch: Batch
    headroom: Optional[List[Optional[int]]]
    event: dict
    record: AutobatchRecord


def choose(cfg, env, dist, rundir: RunDir, model: nn.Module, job, dataset, precision: str,
           trial: Callable[[int, Recovery], None]) -> Chosen:
    """The run's batch, agreed by every training rank, probed with `trial` (the trainer's own step) and
    written to autobatch.json by training rank 0, or taken from it on a resume with the same devices and
    settings (with any runtime reduction since: Recovery wrote each into it). Every training rank calls
    this, with debug.simulate_oom_above already armed on `model` (faults.py)."""
    device, world = env.device, env.train_world
    sig = dist.all_gather_object(_signature(cfg, device, precision))
    cached = rundir.read_autobatch() if env.is_main else None
    cached = dist.broadcast_train(cached if cached and cached.signature == sig else None)
    if cached:  # a resume: the same devices and settings, and any runtime reduction, kept
        batch = Batch(cached.micro_batch, cached.step_batch, world)
        return Chosen(batch, cached.backward_headroom_bytes,
                      {"cached": True, "micro_batch": batch.micro, "accum": batch.accum,
                       "global_batch": batch.global_size}, cached)
    record = AutobatchRecord(signature=sig, requested=cfg.batch.size, global_size=cfg.batch.global_size,
                             train_world=world)
    if cfg.batch.size != "auto":
        batch = plan(cfg.batch, world)
        record.reason = "fixed"
    elif device.type != "cuda" and simulated_limit(cfg.debug.simulate_oom_above, env.train_rank) is None:
        batch = plan(cfg.batch, world, job.cfg.batch_size)
        record.reason = f"no device memory to probe on {device.type}: the job's default micro-batch"
        log.info("batch.size=auto on %s: no memory to probe, using the job's default micro-batch %d",
                 device.type, job.cfg.batch_size)
    else:
        batch = _probe(cfg, env, dist, model, job, trial, record, sig)
    record.micro_batch, record.step_batch, record.accum, record.global_batch = \
        batch.micro, batch.step_samples, batch.accum, batch.global_size
    if env.is_main:
        rundir.write_autobatch(record)
    data = record.to_dict()
    event = {k: data[k] for k in ("reason", "micro_batch", "accum", "global_batch", "found", "probes", "seconds",
                                  "validator_budget_bytes") if k in data}
    if record.per_rank:  # the curve: [size, peak bytes, ok, seconds] per probe, per rank
        event["curve"] = [[[p["size"], p["peak_bytes"], p["ok"], p["seconds"]] for p in r["probes"]]
                          for r in record.per_rank]
    return Chosen(batch, record.backward_headroom_bytes, {"cached": False, **event}, record)


def _probe(cfg, env, dist, model: nn.Module, job, trial, record: AutobatchRecord, sig: List[dict]) -> Batch:
    """Search on every training rank, then agree on the smallest answer; fills `record`."""
    device, world = env.device, env.train_world
    # Not in the trial step but on the device during training: DDP's gradient buckets (a copy of the
    # gradients) and, with inline validation, rank 0's evaluation copy of the model.
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda" and dist.distributed_training:  # NCCL's buffers exist before we measure
        dist.all_reduce(torch.zeros(1, device=device))
    # Under fsdp the trial runs the sharded step itself: its all-gathers are measured.
    sharded = is_fsdp(model)
    copies = (world > 1 and not sharded) + (env.is_main and env.validation_mode == "inline")
    validator = cfg.validation.gpu_share if shares_gpu_with_validator(  # a validator on this GPU: its budget
        env, torch.cuda.device_count()) else 0.0
    memory = DeviceMemory(device, cfg.autobatch.fraction - validator, copies * weights)
    record.validator_budget_bytes = int(validator * memory.total) or None
    snap = Rollback(model, device)
    start = min(job.cfg.batch_size, share(cfg.batch.global_size, world) if cfg.batch.global_size else cfg.autobatch.max)
    try:
        lockstep = Lockstep(dist) if sharded else None
        mine = search(train_trial(trial, env, dist, model), start, cfg.autobatch.max, cfg.autobatch.max_probes,
                      memory, cfg.autobatch.margin, lockstep)
    finally:
        snap.restore()
        cleanup(device)
    per_rank = dist.all_gather_object({"rank": env.train_rank, "found": mine.found, "largest_ok": mine.largest_ok,
                                       "limit_bytes": mine.limit_bytes, "seconds": round(mine.seconds, 3),
                                       "probes": [asdict(p) for p in mine.probes]})
    found = min(r["found"] for r in per_rank)  # same on every rank: gathered from all
    if found == 0:
        worst = [r["rank"] for r in per_rank if r["found"] == 0]
        raise OutOfMemory(f"batch.size=auto: not even a micro-batch of 1 trains on training rank(s) {worst} "
                          f"of device {sig[worst[0]]['device']}; use a smaller model or more memory")
    batch = plan(cfg.batch, world, found)
    record.reason, record.found, record.per_rank = "probed", found, per_rank
    record.probes = max(len(r["probes"]) for r in per_rank)
    record.backward_headroom_bytes = [backward_headroom(r["probes"], batch.micro) for r in per_rank]
    record.seconds = max(r["seconds"] for r in per_rank)
    log.info("autobatch: micro-batch %d on this rank (%d probes, %.1fs); all ranks agree on %d",
             mine.found, len(mine.probes), mine.seconds, found)
    return batch
