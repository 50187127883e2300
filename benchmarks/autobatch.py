"""Auto batch size: what ours picks against the truth and against the usual tools.

For a ResNet-50-sized and a ViT-B/16-sized synthetic job in bf16, with the launcher's
step (AdamW, EMA on rank 0), each method's micro-batch, its probes and seconds, and
whether `--steps` (200) real training steps then run at that size without OOM:

  true maximum   exact search: x2 until a full step fails, then bisection down to 1
  ours           launcher.batch.probe.search (fraction 0.9, margin 0.05, <= 10 probes)
  ultralytics    AutoBatch: forward + .sum().backward() at 1..16 (+32, 64 on >= 16 GiB), memory_reserved,
                 linear fit, fraction 0.6 of free memory; out of 1..1024 -> 16 (its default)
  lightning-pow  BatchSizeFinder mode=power: from 2, x2 until OOM (3 steps per trial), keep the last fit
  lightning-bin  mode=binsearch: x2, then bisection after the first OOM, then -5% (margin 0.05)
  accelerate     find_executable_batch_size from 4096 (autobatch.max): x0.9 after each OOM

Targets (GPU): ours >= 90% of the true maximum, no OOM in the steps afterwards, <= 10 probes, < 60 s.

    python benchmarks/autobatch.py [--quick] [--steps 200] [--models resnet50,vitb16]

Without a GPU (or with --quick) the same search code runs against a *simulated* device:
a tiny real model executes every trial, and a memory model decides OOM (fixed = weights +
grads + AdamW state + EMA, plus a per-sample activation cost taken from the H100 reference
maxima in /work/shared/anchors/h100-measurements.md; Ultralytics' forward+backward profile
sees no optimizer state or EMA, as in the original). The simulated device models the caching
allocator (tests/support/simulated_device.py: freed blocks stay reserved until emptied), so a
probe that reads stale cached memory on a GPU reads it here too (issue 13). Those figures check the plumbing and the
search logic, not a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write  # noqa: E402
from launcher.jobs.synthetic import Synthetic, SyntheticJob  # noqa: E402
from launcher.batch import probe  # noqa: E402
from tests.support.simulated_device import SimulatedDevice  # noqa: E402
from launcher.batch.recovery import cleanup  # noqa: E402
from launcher.ema import EMA  # noqa: E402
from launcher.config.schema import AutobatchConfig  # noqa: E402

GiB = 1 << 30
MODELS = {"resnet50": dict(model="resnet"), "vitb16": dict(model="vit")}
TINY = {"resnet50": dict(model="resnet", width=8, depth=[1, 1, 1, 1], image_size=32, num_classes=10),
        "vitb16": dict(model="vit", dim=32, layers=2, heads=2, patch=8, image_size=32, num_classes=10)}
# Simulated device: bytes per sample of activations such that an 80 GiB device fits the H100 reference maxima.
SIM_PER_SAMPLE = {"resnet50": 80 * GiB * 0.97 / 1856, "vitb16": 80 * GiB * 0.97 / 1184}
SIM_PARAMS = {"resnet50": 25.6e6, "vitb16": 86.6e6}


class Counter:
    """Counts the trials a method runs and the time they take; raises the device's OOMs."""

    def __init__(self, run: Callable[[int], Optional[int]]):
        self.run, self.probes = run, 0

    def __call__(self, n: int) -> Optional[int]:
        self.probes += 1
        return self.run(n)


class Rig:
    """One model on one device: a full training step, Ultralytics' profile, and a long run."""

    def __init__(self, name: str, device: torch.device, simulate: bool):
        self.name, self.device, self.simulate = name, device, simulate
        self.job = Synthetic(SyntheticJob(**(TINY if simulate else MODELS)[name]))
        self.data = self.job.datasets()[0]
        self.model = self.job.model().to(device)
        self.amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
        self.opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        self.ema = lambda m: EMA(m, 0.9999)
        if simulate:
            p = SIM_PARAMS[name] * 4
            self.total, self.per = 80 * GiB, SIM_PER_SAMPLE[name]
            self.fixed_step, self.fixed_profile = 5 * p, 2 * p  # weights, grads, 2 AdamW moments, EMA
            self.capacity = 0.97 * self.total  # the allocator never gets the last few percent
            # A caching allocator: weights resident, the step's blocks cached after it until emptied.
            self.sim = SimulatedDevice(self.total, 0.97, weights=p, fixed=4 * p, per_sample=self.per)

    # -- the primitives the methods use ----------------------------------------------------------
    def step(self, n: int) -> int:
        """A full step at n; returns its peak bytes or raises OutOfMemoryError."""
        if self.simulate:
            self.real_trial(2)  # the tiny model only times the plumbing
            self.sim.step(n)  # raises a real OutOfMemoryError where the simulated device is full
            return int(self.fixed_step + self.per * n)
        mem = probe.DeviceMemory(self.device, 1.0)
        mem.start()
        self.real_trial(n)
        return mem.peak()

    def profile(self, n: int) -> float:
        """Ultralytics' profile_ops: forward, .sum().backward(), memory_reserved (GB)."""
        if self.simulate:
            self.real_trial(2)  # the tiny model only times the plumbing
            return (self.fixed_profile + self.per * n) / 1e9
        x, _ = probe.repeat_sample(self.data, n, self.device)
        with self.amp():
            y = self.model(x)
        y.float().sum().backward()
        for p in self.model.parameters():
            p.grad = None
        return torch.cuda.memory_reserved(self.device) / 1e9

    def free_bytes(self) -> int:
        if self.simulate:
            return int(self.total - self.fixed_profile / 2)  # the weights are already there
        t = torch.cuda.get_device_properties(self.device).total_memory
        return t - (torch.cuda.memory_reserved(self.device) + torch.cuda.memory_allocated(self.device))

    def long_run(self, n: int, steps: int) -> bool:
        """`steps` real training steps at n with a persistent optimizer and EMA: True if no OOM."""
        if self.simulate:
            try:
                self.step(n)
                return True
            except torch.OutOfMemoryError:
                return False
        try:
            self._steps(n, steps)
            torch.cuda.synchronize(self.device)
            return True
        except torch.OutOfMemoryError:
            return False

    def real_trial(self, n: int) -> None:
        """The probe's trial: two full steps at n (the second with the optimizer state allocated)."""
        self._steps(n, 2)

    def _steps(self, n: int, steps: int) -> None:
        """`steps` training steps at n (bf16 forward, backward, AdamW, EMA) with a throwaway optimizer and
        EMA; the weights are restored afterwards."""
        snap = probe.Rollback(self.model)
        opt, ema = self.opt(self.model), self.ema(self.model)
        try:
            x, y = probe.repeat_sample(self.data, n, self.device)
            for _ in range(steps):
                with self.amp():
                    loss = self.job.loss(self.model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.update(self.model)
        finally:
            for p in self.model.parameters():
                p.grad = None
            del opt, ema
            snap.restore()
            cleanup(self.device)

    def ok(self, n: int) -> bool:
        try:
            self.step(n)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            cleanup(self.device)


# -- the methods ---------------------------------------------------------------------------------
def true_max(rig: Rig, cap: int) -> Dict:
    c = Counter(rig.ok)
    lo, hi, n = 0, None, 1
    while hi is None and n <= cap:
        if c(n):
            lo, n = n, n * 2
        else:
            hi = n
    hi = hi or cap + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if c(mid) else (lo, mid)
    return {"batch": lo, "probes": c.probes}


def ours(rig: Rig, cfg: AutobatchConfig, start: int) -> Dict:
    if rig.simulate:  # the measurement itself runs against the simulated caching allocator
        memory = probe.DeviceMemory(rig.device, cfg.fraction, allocator=rig.sim)
        trial = rig.step
    else:
        memory = probe.DeviceMemory(rig.device, cfg.fraction)
        trial = rig.real_trial
    snap = probe.Rollback(rig.model)
    out = probe.search(trial, start, cfg.max, cfg.max_probes, memory, cfg.margin)
    snap.restore()
    return {"batch": out.found, "probes": len(out.probes)}


def ultralytics(rig: Rig, fraction: float = 0.6, default: int = 16) -> Dict:
    f = rig.free_bytes() / 1e9
    sizes = [1, 2, 4, 8, 16] + ([32, 64] if rig.free_bytes() / GiB >= 16 else [])
    mems, probes = [], 0
    for b in sizes:
        probes += 1
        try:
            mems.append(rig.profile(b))
        except torch.OutOfMemoryError:
            mems.append(None)
        cleanup(rig.device)
    ys = [m for m in mems if m is not None]
    p = np.polyfit(sizes[:len(ys)], ys, deg=1)
    b = int((f * fraction - p[1]) / p[0])
    if None in mems:
        i = mems.index(None)
        if b >= sizes[i]:
            b = sizes[max(i - 1, 0)]
    if b < 1 or b > 1024:
        b = default
    return {"batch": b, "probes": probes}


def lightning(rig: Rig, mode: str, init: int = 2, max_trials: int = 25, margin: float = 0.05) -> Dict:
    c = Counter(rig.ok)  # each Lightning trial is steps_per_trial=3 fit steps; ours runs 2 (same memory)
    size, low, high = init, 1, None
    for _ in range(max_trials):
        if c(size):
            low = size
            if high is not None and high - low <= 1:
                break
            size = size * 2 if high is None else (low + high) // 2
        else:
            high = size
            if mode == "power":
                size = low
                break
            size = (low + high) // 2
            if high - low <= 1:
                break
    if mode == "binsearch":
        size = int(low * (1 - margin))
    return {"batch": max(size, 1), "probes": c.probes}


def accelerate(rig: Rig, start: int) -> Dict:
    c = Counter(rig.ok)
    b = start
    while b > 0 and not c(b):
        b = int(b * 0.9)
    return {"batch": b, "probes": c.probes}


def _overhead_worker(rank: int, world: int, port: int, steps: int, micro: int, accum: int, out) -> None:
    """One DDP rank: step time with OOM recovery (one agreement before the last backward, carrying the stop
    flags) and without (retries=0: the step-end stop agreement alone); DDP all-reduces inside the last backward
    either way, and either way a step makes one host-side agreement."""
    import os
    import tempfile

    from launcher.batch.geometry import Batch
    from launcher.batch.recovery import Headroom, Recovery
    from launcher.config.schema import Config
    from launcher.distributed.agreement import Agreement
    from launcher.distributed.env import Env
    from launcher.distributed.groups import Dist
    from launcher.distributed.signals import StopFlag
    from launcher.distributed.wrap import GradSync
    from launcher.rundir import RunDir
    from launcher.step import forward_backward
    from launcher.telemetry.off import OFF
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    env = Env(rank, world, rank, world, 0, None, torch.device("cpu"))
    dist = Dist(env)
    torch.manual_seed(0)
    job = Synthetic(SyntheticJob(**TINY["resnet50"]))
    model = job.model()
    ddp = DDP(model, process_group=dist.group)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = probe.repeat_sample(job.datasets()[0], micro * accum, env.device)
    tel, scaler = OFF, torch.amp.GradScaler("cpu", enabled=False)
    res = {}
    for retries in (0, 3, 0, 3):  # interleaved, best of two
        cfg = Config()
        cfg.autobatch.max_retries = retries
        flag = StopFlag(cfg.run.stop_signals)
        agreement = Agreement(dist, env)  # the Trainer's flags: a stop signal, early stop, a failed save
        for name, read in (("stop", lambda: flag.signum), ("early_stop", lambda: 0), ("save_failed", lambda: 0)):
            agreement.flag(name, read)
        oom = Recovery(cfg.autobatch, env, RunDir(tempfile.mkdtemp()), tel, Batch(micro, micro * accum, world),
                       agreement, Headroom(env.device, None, rank, lambda step: False))
        grads = GradSync(ddp)
        times = []
        for i in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            forward_backward(x, y, oom, grads, ddp, job, scaler, env.device, "fp32", i)  # the training step's own
            opt.step()
            opt.zero_grad(set_to_none=True)
            agreement.step_end()
            times.append(time.perf_counter() - t0)
        med = sorted(times[2:])[len(times[2:]) // 2]
        res[retries] = min(res.get(retries, med), med)
    flag = torch.zeros(world)
    t0 = time.perf_counter()
    for _ in range(200):
        torch.distributed.all_reduce(flag, group=dist.group)
    res["agree"] = (time.perf_counter() - t0) / 200
    if rank == 0:
        out.put(res)
    dist.close()


def overhead(steps: int = 12, micro: int = 8, accum: int = 2) -> List[dict]:
    """Two gloo ranks on CPU: the agreement's cost and the step time with recovery on vs off."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_overhead_worker, args=(r, 2, port, steps, micro, accum, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join()
    print(f"agreement all-reduce (2 gloo ranks, CPU tensor): {res['agree'] * 1e6:.0f} us; step with recovery "
          f"{res[3] * 1e3:.1f} ms vs DDP's own sync (max_retries=0) {res[0] * 1e3:.1f} ms")
    return [{"case": "OOM agreement all-reduce (2 gloo ranks)", "ours": res["agree"] * 1e6, "baseline": None,
             "baseline_name": "-", "ratio": None, "unit": "us", "target": None, "met": None},
            {"case": f"step time, recovery on vs max_retries=0 (tiny ResNet, {micro}x{accum}, 2 CPU ranks)",
             "ours": res[3] * 1e3, "baseline": res[0] * 1e3, "baseline_name": "max_retries=0",
             "ratio": round(res[0] / res[3], 3), "unit": "ms", "target": None, "met": None}]


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="simulated device on CPU (also without a GPU)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--models", default="resnet50,vitb16")
    args = ap.parse_args(argv)
    simulate = args.quick or not torch.cuda.is_available()
    device = torch.device("cpu" if simulate else "cuda")
    torch.manual_seed(0)
    cfg = AutobatchConfig()
    rows, details = [], []
    for name in args.models.split(","):
        rig = Rig(name, device, simulate)
        methods = {"true maximum": lambda: true_max(rig, cfg.max),
                   "ours": lambda: ours(rig, cfg, 32),
                   "ultralytics": lambda: ultralytics(rig),
                   "lightning-power": lambda: lightning(rig, "power"),
                   "lightning-binsearch": lambda: lightning(rig, "binsearch"),
                   "accelerate": lambda: accelerate(rig, cfg.max)}
        res = {}
        for method, fn in methods.items():
            t0 = time.perf_counter()
            r = fn()
            r["seconds"] = round(time.perf_counter() - t0, 2)
            r["runs_steps"] = rig.long_run(r["batch"], args.steps) if method != "true maximum" else None
            res[method] = r
            print(f"{name:<9} {method:<20} batch {r['batch']:>5}  probes {r['probes']:>3}  {r['seconds']:>7.2f}s"
                  f"  {args.steps} steps: {r['runs_steps']}")
        truth, mine = res["true maximum"]["batch"], res["ours"]
        frac = mine["batch"] / truth if truth else 0.0
        met = frac >= 0.9 and mine["runs_steps"] and mine["probes"] <= 10 and (simulate or mine["seconds"] < 60)
        rows.append({"case": f"{name} micro-batch vs true maximum", "ours": mine["batch"], "baseline": truth,
                     "baseline_name": "exhaustive", "ratio": round(frac, 3), "unit": "samples",
                     "target": ">= 0.9 of max, no OOM, <= 10 probes, < 60 s", "met": bool(met)})
        for method, r in res.items():
            if method not in ("true maximum", "ours"):
                rows.append({"case": f"{name} {method}", "ours": mine["batch"], "baseline": r["batch"],
                             "baseline_name": method, "ratio": round(r["batch"] / truth, 3) if truth else None,
                             "unit": "samples", "target": None, "met": None})
        details.append({"model": name, "methods": res, "simulated": simulate})
    rows += overhead()
    path = write("autobatch", device, rows, simulated=simulate, steps=args.steps, details=details,
                 note="simulated device: plumbing and search logic only, no GPU figures" if simulate else "")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
