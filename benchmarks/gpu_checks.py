"""The device-path checks of benchmarks/gpu_e2e.sh: what only a GPU can prove, and a dry run of it on a CPU.

    python3 benchmarks/gpu_checks.py [api race gate fsdp prefetch]   # one process, one GPU; ~30 s on an H100
    python3 benchmarks/gpu_checks.py sync <launcher train overrides>  # `launcher train`, host syncs counted

One line per check: PASS, FAIL or SKIP (a GPU-only check on a CPU), then a JSON summary line; the exit
status is the number of FAILs.

  api       torch, CUDA, the FSDP2 API the launcher calls (launcher.distributed.fsdp.api_missing, can_reset)
  race      every hand-off snapshot's file bit-equal to the EMA when its snapshot was taken (checksums on
            the device), and, as its control, the same without the staging fence() the training step
            calls before its optimizer step: it must tear, else the check is blind
  gate      the EMA's device gate bit-equal to the host path; a skipped step keeps the bits; the fp16
            scaler's skip flag stays on the device
  fsdp      a 1-rank NCCL group: a BatchNorm ResNet sharded at bf16 trains (forward, backward, AdamW and
            SGD as build_optimizer picks them), the EMA gates on the flag optimizer_step hands it
  prefetch  DevicePrefetcher: the batches arrive intact while the compute stream is busy
  sync      every synchronizing CUDA call of a training run's main thread, by call site
            (torch.cuda.set_sync_debug_mode); a site that syncs in half the steps or more FAILs (the
            launcher adds no host sync to a step); other threads' are counted apart
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
GPU = torch.cuda.is_available()
DEV = torch.device("cuda", 0) if GPU else torch.device("cpu")
RESULTS: list = []


def report(name: str, ok, detail: str = "") -> None:
    status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    RESULTS.append({"check": name, "status": status, "detail": detail})
    print(f"{status} {name}: {detail}", flush=True)


def checksum(t: torch.Tensor) -> torch.Tensor:
    """Exact and order-independent: the tensor's 32-bit words summed in int64, on its device."""
    return t.detach().contiguous().view(torch.int32).to(torch.int64).sum()


def api() -> None:
    from launcher.distributed import fsdp
    from torch.distributed.fsdp import FSDPModule

    missing = fsdp.api_missing()
    report("api: FSDP2", not missing, f"torch {torch.__version__}, CUDA {torch.version.cuda}; missing: {missing}")
    report("api: reset_iter_state", True, "present: an fsdp OOM is redone in place" if hasattr(
        FSDPModule, "reset_iter_state") else "absent: an fsdp OOM restarts (exit 75) instead")


def _race(fence: bool, steps: int, numel: int) -> list:
    from safetensors.torch import load_file

    from launcher.checkpoint.staging import Stage
    from launcher.ema import EMA
    from launcher.validation.handoff import Writer, data_path

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(numel, device=DEV))
    ema = EMA(model, decay=0.5, ramp="none", tau=1.0)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-checks-race-"))
    try:
        (tmp / "val").mkdir()
        w = Writer(tmp, "all", keep=10**6)
        stage = Stage(DEV)  # the checkpoint's snapshot, which the hand-off shares
        sums = []
        for i in range(steps):
            if fence:
                stage.fence()  # what the training step does before its optimizer step
            with torch.no_grad():
                model.w.add_(1.0)  # the optimizer step
            ema.update(model, skip=torch.zeros((), dtype=torch.bool, device=DEV))
            sums.append(checksum(ema.shadow["w"]))  # on the training stream, right after the update
            snap = stage.take({"ema": ema.shadow}, i)
            w.put(i, 0, snap, {"ema": snap.state["ema"]})
        stage.fence()
        w.flush()
        return [i for i in range(steps) if checksum(load_file(str(data_path(w.dir, i)))["ema/w"]).item() != sums[i].item()]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def race() -> None:
    steps, numel = (6, 32 * 2**20) if GPU else (4, 1000)  # 128 MiB fp32 on a GPU: a copy long enough to race
    bad = _race(True, steps, numel)
    report("race: snapshots equal the EMA when taken", not bad, f"{len(bad)}/{steps} differ")
    if not GPU:
        return report("race: control without fence() tears", None, "needs a GPU (the CPU copy is synchronous)")
    bad = _race(False, steps, numel)
    report("race: control without fence() tears", bool(bad), f"{len(bad)}/{steps} torn (0: the check is blind)")


def gate() -> None:
    from launcher.ema import EMA

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 6 * 6, 4)).to(DEV)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    host, dev = EMA(m, 0.99, "exp", 10.0), EMA(m, 0.99, "exp", 10.0)
    no, yes = (torch.tensor(v, device=DEV) for v in (False, True))
    for _ in range(5):
        m(torch.randn(4, 3, 8, 8, device=DEV)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        host.update(m)
        dev._update_gated(m, no)  # what update() runs for a GPU flag, on any device
    same = all(torch.equal(host.shadow[k], dev.shadow[k]) for k in host.shadow)
    report("gate: device gate == host path", same and host.updates == dev.updates, f"bit-identical {same}")
    before = {k: v.clone() for k, v in dev.shadow.items()}
    m(torch.randn(4, 3, 8, 8, device=DEV)).sum().backward()
    opt.step()
    dev._update_gated(m, yes)
    kept = all(torch.equal(before[k], dev.shadow[k]) for k in before)
    report("gate: a skipped step keeps the bits", kept and dev.skipped == 1, f"skipped {dev.skipped}")
    if not GPU:
        return report("gate: fp16 skip flag on the device", None, "needs a GPU")
    from launcher import step

    scaler = torch.amp.GradScaler("cuda")
    p = torch.nn.Parameter(torch.ones(4, device=DEV))
    o = torch.optim.AdamW([p], lr=1e-3, fused=True)
    scaler.scale((p * float("inf")).sum()).backward()
    before_scale = step.scale_of(scaler)
    scaler.step(o)
    scaler.update()
    flag = step.scaler_skipped(scaler, before_scale)
    report("gate: fp16 skip flag on the device", flag.is_cuda and bool(flag), repr(flag))


def fsdp() -> None:
    import torch.distributed as dist

    from launcher import step
    from launcher.config.schema import Config, OptimConfig
    from launcher.distributed import fsdp as F
    from launcher.ema import EMA
    from launcher.jobs.synthetic import ResNet
    from launcher.optim import build_optimizer, build_scheduler
    from launcher.precision import autocast

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if GPU:
        torch.cuda.set_device(DEV)
    dist.init_process_group("cpu:gloo,cuda:nccl" if GPU else "gloo", rank=0, world_size=1)
    precision = "bf16"  # the GPU default; bf16 autocast runs on a CPU too
    try:
        for name in ("adamw", "sgd"):
            torch.manual_seed(0)
            model = ResNet(width=16, depth=(1, 1), classes=10).to(DEV)
            F.shard(model, dist.group.WORLD, DEV, precision)
            cfg = Config()
            cfg.optim = OptimConfig(name=name)
            opt = build_optimizer(model, cfg.optim, DEV)
            sched = build_scheduler(opt, cfg.sched, cfg.optim.lr, 10, 0)
            scaler, ema = torch.amp.GradScaler(DEV.type, enabled=False), EMA(model, 0.9, "none")
            try:
                for i in range(3):
                    F.unshard_for_step(model)  # what runtime OOM recovery (on by default) does first
                    with autocast(DEV, precision):
                        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32, device=DEV)),
                                                                 torch.arange(8, device=DEV) % 10)
                    loss.backward()
                    flag = step.optimizer_step(model, step.StepParts(opt, sched, scaler, None), cfg, i, gate=True)
                    ema.update(model, skip=flag)
                F.reset_step(model)
                ok = bool(torch.isfinite(loss)) and ema.updates == 3
                report(f"fsdp: BatchNorm ResNet at {precision}, {name} (fused={opt.defaults.get('fused')}), EMA gate",
                       ok, f"flag {type(flag).__name__} on {flag.device}, EMA updates {ema.updates}")
            except Exception as e:  # noqa: BLE001
                report(f"fsdp: BatchNorm ResNet at {precision}, {name}", False,
                       f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        if GPU:
            torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()


def prefetch() -> None:
    from launcher.data import DevicePrefetcher

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 3, 64, 64, generator=g), torch.arange(64)) for _ in range(6)]
    if GPU:
        data = [(x.pin_memory(), y) for x, y in data]
    w, sums = torch.randn(1024, 1024, device=DEV), []
    for x, _ in DevicePrefetcher(data, DEV, channels_last=True):
        for _ in range(10 if GPU else 1):  # keep the compute stream busy while the next copy runs
            w = torch.tanh(w @ w)
        sums.append(checksum(x.float()))
    same = [s.item() for s in sums] == [checksum(x.contiguous(memory_format=torch.channels_last)).item()
                                        for x, _ in data]
    report("prefetch: batches intact, NHWC", same, f"{len(sums)} batches")


def sync(overrides: list) -> None:
    """`launcher train <overrides>` in this process with every synchronizing CUDA call counted by its
    innermost launcher frame; a site hit in most of the run's steps is a per-step sync. On a CPU the run
    alone (there is nothing to count)."""
    from launcher.cli import main

    if not GPU:
        report("sync: the run finished", main(["train", *overrides]) == 0, "")
        return report("sync: no per-step host sync", None, "needs a GPU (torch.cuda.set_sync_debug_mode)")

    hits: Counter = Counter()
    show = warnings.showwarning

    def count(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        if threading.current_thread() is not threading.main_thread():  # the loader's pin thread, the writer
            hits["(another thread)"] += 1
            return
        ours = [f for f in traceback.extract_stack()[:-1] if "/launcher/" in f.filename or "/jobs/" in f.filename]
        hits[f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno} {ours[-1].name}" if ours else "(outside)"] += 1

    warnings.simplefilter("always")
    warnings.showwarning = count
    torch.cuda.set_sync_debug_mode("warn")
    try:
        rc = main(["train", *overrides])
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = show
    steps = next((int(a.split("=")[1]) for a in overrides if a.startswith("train.max_steps=")), 0)
    per_step = {site: n for site, n in hits.items() if steps and n >= steps // 2 and site != "(another thread)"}
    report("sync: the run finished", rc == 0, f"exit {rc}")
    report("sync: no per-step host sync", not per_step,
           f"{sum(hits.values())} syncs in {steps} steps; per-step sites: {per_step}; all: {dict(hits.most_common(8))}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["sync"]:
        sync(args[1:])
    else:
        for name in args or ["api", "race", "gate", "fsdp", "prefetch"]:
            try:
                globals()[name]()
            except Exception as e:  # noqa: BLE001 - a check that crashes is a FAIL; the others still run
                report(name, False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                traceback.print_exc(limit=4)
    print("CHECKS " + json.dumps(RESULTS), flush=True)
    sys.exit(sum(r["status"] == "FAIL" for r in RESULTS))
