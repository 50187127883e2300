"""What the launcher costs: `launcher train` (EMA, validation, metrics and telemetry on)
against a bare DDP loop (benchmarks/bare_ddp.py) with the same model, batch, precision and
optimizer, in the same run; then what each speed option buys, and what the EMA's finite-loss
check costs with a host sync against the device-side gate.

    python benchmarks/overhead.py            # GPU sizes: ResNet-50 and ViT-B/16, bf16
    python benchmarks/overhead.py --quick    # CPU/CI sizes: tiny nets, fp32, seconds
    python benchmarks/overhead.py --quick --nproc 2 --repeat 5   # 2 ranks (gloo on CPU): DDP, the OOM
                                             # agreement, a validator rank; medians of interleaved rounds
    python benchmarks/overhead.py --like-for-like --models resnet   # each difference on its own line

Writes benchmarks/out/overhead.json (format: benchmarks/common.py). Target: ratio >= 0.98.
The bare loop keeps its batches on the device and writes no checkpoint; `launcher train` reads the
job's DataLoader and writes checkpoints at the default cadence, as a user runs it: at every
validation step (inside the timed window) and every checkpoint.every_steps (200); what a checkpoint
alone costs is benchmarks/checkpoint.py's subject. `--like-for-like` measures each of these
differences apart.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common


def rate_row(case: str, ours: float, base: float, base_name: str, unit: str, target: float = None) -> dict:
    """A row for a rate (higher is better): ratio = ours / baseline."""
    ratio = ours / base
    return common.row(case, round(ours, 2), round(base, 2), base_name, unit, None if target is None else
                      f">= {target}", None if target is None else ratio >= target, round(ratio, 4))

FULL = {  # GPU: the anchor sizes (h100-measurements.md), batch 128, bf16
    "resnet": {"model": "resnet", "train_samples": 8192, "val_samples": 1024},
    "vit": {"model": "vit", "train_samples": 8192, "val_samples": 1024},
}
QUICK = {  # CPU: the same architectures, shrunk
    "resnet": {"model": "resnet", "width": 8, "depth": [1, 1, 1, 1], "image_size": 32, "num_classes": 10,
               "train_samples": 2048, "val_samples": 64},
    "vit": {"model": "vit", "dim": 64, "layers": 2, "heads": 2, "patch": 8, "image_size": 32, "num_classes": 10,
            "train_samples": 2048, "val_samples": 64},
}


def job_overrides(job: dict) -> list:
    return ["job=synthetic"] + [f"job.{k}={json.dumps(v).replace(' ', '')}" for k, v in job.items()]


def rate(kind: str, job: dict, s: argparse.Namespace, tmp: Path, extra=(), train_ranks: int = None) -> float:
    """Steady-state samples/s of `launcher train` or the bare loop, over the steps after warmup:
    wall clock on a GPU, per CPU-second on a CPU (see common.launcher_window). Samples count the
    training ranks only (`train_ranks`, default all; a validator rank trains nothing). `extra`: overrides
    of `launcher train`, or arguments of bare_ddp.py."""
    metrics = tmp / f"{kind}-{time.monotonic_ns()}" / "metrics.jsonl"
    if kind == "bare":
        metrics.parent.mkdir(parents=True)
        cmd = common.python_cmd(s.nproc, str(common.ROOT / "benchmarks" / "bare_ddp.py"), "--job", json.dumps(job),
                                "--batch", str(s.batch), "--steps", str(s.steps), "--warmup", str(s.warmup),
                                "--precision", s.precision, "--out", str(metrics), *extra)
    else:
        cmd = common.python_cmd(s.nproc, "-m", "launcher", "train", *job_overrides(job), f"run.dir={metrics.parent}",
                                f"batch.size={s.batch}", f"train.max_steps={s.steps}", f"train.precision={s.precision}",
                                f"train.log_every={s.log_every}", f"data.workers={s.workers}",
                                f"validation.every_steps={s.val_every}", f"validation.batch_size={s.batch}",
                                "logger.progress=plain", *extra)
    w = common.launcher_window(cmd, metrics, s.warmup, s.steps, s.batch * (train_ranks or s.nproc))
    return w["wall_rate"] if s.gpu else w["cpu_rate"]


def ema_gate(job: dict, s: argparse.Namespace, steps: int) -> tuple:
    """ms per training step with the EMA skipped on a host-read finiteness check (a sync
    per step) and with the device-side gate (launcher.step.nonfinite on a GPU)."""
    from launcher.jobs.synthetic import Synthetic, SyntheticJob
    from launcher.ema import EMA

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the child processes (common.env)
    model = Synthetic(SyntheticJob(**job)).model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ema = EMA(model, 0.9999, "exp", 2000.0)
    size = job.get("image_size", 224)
    x = torch.randn(s.batch, 3, size, size, device=device)
    y = torch.randint(job.get("num_classes", 1000), (s.batch,), device=device)
    dtype = torch.bfloat16 if s.precision == "bf16" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time  # CPU: see rate()

    def timed(gate_on_device: bool) -> float:
        for i in range(steps + 3):
            if i == 3:
                sync()
                t0 = clock()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            flag = ~torch.isfinite(loss.detach())
            ema.update(model, skip=flag if gate_on_device else bool(flag))
        sync()
        return (clock() - t0) / steps * 1000

    timed(False)  # warm up allocator and kernels
    sync_ms, gate_ms = common.best_of(s.repeat, lambda: -timed(False), lambda: -timed(True))
    return -sync_ms, -gate_ms


def like_for_like(name: str, job: dict, s: argparse.Namespace, tmp: Path, unit: str) -> tuple:
    """Each difference between `launcher train` and the bare loop on a line of its own (benchmarks/gpu_e2e.sh):
    the launcher against the bare loop on the same data path (the job's DataLoader, `s.workers` workers) with
    the same channels_last and no checkpoints in either; what reading the DataLoader costs the bare loop
    against batches kept on the device; what validating every `s.val_every` steps on the same GPU costs the
    launcher, with the checkpoint it writes at each validation step."""
    nhwc = str(s.gpu and job["model"] == "resnet").lower()  # bare_ddp.py's own choice (auto) on each device
    data = ["--workers", str(s.workers), "--channels-last", nhwc]
    same = [f"train.channels_last={nhwc}", f"data.workers={s.workers}", "checkpoint.every_steps=0"]
    bare_loader, bare_device, off, ours = common.best_of(
        s.repeat, lambda: rate("bare", job, s, tmp, ["--data", "loader", *data]),
        lambda: rate("bare", job, s, tmp, ["--data", "device", *data]),
        lambda: rate("launcher", job, s, tmp, [*same, "validation.mode=off"]),
        lambda: rate("launcher", job, s, tmp, same))
    rows = [rate_row(f"{name}: launcher, validation off, vs bare loop: same loader, channels_last={nhwc}, no "
                     "checkpoints", off, bare_loader, "bare loop (DataLoader)", unit, target=0.98),
            rate_row(f"{name}: bare loop reading the DataLoader ({s.workers} workers) vs batches kept on the device",
                     bare_loader, bare_device, "bare loop (device data)", unit),
            rate_row(f"{name}: launcher validating every {s.val_every} steps (validator on the same device, a "
                     "checkpoint each time) vs validation off", ours, off, "validation off", unit)]
    return rows, [f"{name}: like for like: {s.workers} loader workers on both sides, best of {s.repeat}"]


def multi_rank(name: str, job: dict, s: argparse.Namespace, tmp: Path, unit: str) -> tuple:
    """--nproc N >= 2: the bare DDP loop, the default configuration (OOM recovery on: one agreement per
    step) and the same with autobatch.max_retries=0, validation off, then the default with a validator
    rank (N-1 training ranks), in `repeat` interleaved rounds; rows carry medians, notes the spread."""
    off, n = ["validation.mode=off"], s.nproc
    cases = {"bare": lambda: rate("bare", job, s, tmp),
             "default": lambda: rate("launcher", job, s, tmp, off),
             "retries0": lambda: rate("launcher", job, s, tmp, off + ["autobatch.max_retries=0"]),
             "validator": lambda: rate("launcher", job, s, tmp, (), train_ranks=n - 1)}
    runs = {k: [] for k in cases}
    for _ in range(s.repeat):
        for k, measure in cases.items():
            runs[k].append(measure())
    med = {k: statistics.median(v) for k, v in runs.items()}

    def ratios(a: str, b: str) -> list:  # per round: both sides ran next to each other
        return [x / y for x, y in zip(runs[a], runs[b])]

    rows, notes = [], []
    for a, b, case, base_name, target in (
            ("default", "bare", f"{name}: {n} ranks, launcher default (recovery on), validation off, vs bare DDP",
             "bare DDP loop", 0.97),
            ("default", "retries0", f"{name}: {n} ranks, launcher default vs autobatch.max_retries=0, validation off",
             "max_retries=0", 0.97),
            ("retries0", "bare", f"{name}: {n} ranks, launcher max_retries=0, validation off, vs bare DDP",
             "bare DDP loop", None),
            ("validator", "bare", f"{name}: {n} ranks = {n - 1} training + validator rank, vs bare DDP on {n}",
             f"bare DDP loop ({n} ranks)", None)):
        r = ratios(a, b)
        ratio = statistics.median(r)
        rows.append(common.row(case, round(med[a], 2), round(med[b], 2), base_name, unit,
                               None if target is None else f">= {target}", None if target is None else ratio >= target,
                               round(ratio, 4)))
        notes.append(f"{case}: per-round ratios {', '.join(f'{x:.3f}' for x in r)} (median {ratio:.3f}, "
                     f"spread {min(r):.3f}-{max(r):.3f})")
    notes.append(f"{name}: {unit} per case over {s.repeat} rounds: " + "; ".join(
        f"{k} {', '.join(f'{v:.1f}' for v in vs)}" for k, vs in runs.items()))
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU/CI sizes")
    ap.add_argument("--models", default="resnet,vit")
    ap.add_argument("--nproc", type=int, default=1, help="training processes (torchrun when > 1)")
    ap.add_argument("--no-options", action="store_true", help="skip the speed-option cases")
    ap.add_argument("--like-for-like", action="store_true", help="only the like-for-like rows (gpu_e2e.sh)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: 8 at full sizes, else 0)")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats; the best of each is kept "
                    "(--nproc >= 2: the median, with the spread in the notes)")
    s = ap.parse_args()
    gpu = s.gpu = torch.cuda.is_available()
    sizes = QUICK if s.quick or not gpu else FULL
    s.batch, s.steps, s.warmup, s.log_every, s.val_every = (16, 50, 10, 5, 10) if sizes is QUICK else \
        (128, 120, 20, 10, 50)
    s.precision = "bf16" if gpu else "fp32"
    s.workers = s.workers if s.workers is not None else 0 if sizes is QUICK else 8
    unit = "samples/s" if gpu else "samples/CPU-s"
    rows, notes = [], [f"{'CPU/CI' if sizes is QUICK else 'full'} sizes, batch {s.batch} per rank, {s.nproc} "
                       f"process(es), {s.precision}, {s.steps} steps, timed after step {s.warmup}; validation "
                       f"(validation.mode=auto) every {s.val_every} steps inside the window, each with its checkpoint, "
                       "checkpoint.every_steps at its default (200)"]
    if s.nproc > 1:
        notes = [f"{'CPU/CI' if sizes is QUICK else 'full'} sizes, batch {s.batch} per rank, {s.nproc} processes"
                 f"{' (gloo)' if not gpu else ''}, {s.precision}, {s.steps} steps, timed after step {s.warmup}; "
                 "the bare loop keeps synthetic batches on the device, the launcher reads the job's dataset; "
                 "samples count training ranks only"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in s.models.split(",") if s.like_for_like else ():
            more_rows, more_notes = like_for_like(name, sizes[name], s, Path(tmp), unit)
            rows, notes = rows + more_rows, notes + more_notes
        for name in s.models.split(",") if s.nproc > 1 and not s.like_for_like else ():
            more_rows, more_notes = multi_rank(name, sizes[name], s, Path(tmp), unit)
            rows, notes = rows + more_rows, notes + more_notes
        for name in s.models.split(",") if s.nproc == 1 and not s.like_for_like else ():
            job = sizes[name]
            off = ["validation.mode=off"]
            bare, ours, no_val, no_ema = common.best_of(
                s.repeat, lambda: rate("bare", job, s, Path(tmp)), lambda: rate("launcher", job, s, Path(tmp)),
                lambda: rate("launcher", job, s, Path(tmp), off),
                lambda: rate("launcher", job, s, Path(tmp), off + ["ema.enabled=false"]))
            rows.append(rate_row(f"{name}: launcher train (EMA, validation, metrics) vs bare DDP loop", ours, bare,
                                   "bare DDP loop", unit, target=0.98))
            rows.append(rate_row(f"{name}: launcher train, validation.mode=off, vs bare DDP loop", no_val, bare,
                                   "bare DDP loop", unit, target=0.98))
            rows.append(rate_row(f"{name}: launcher train, validation and EMA off, vs bare DDP loop", no_ema, bare,
                                   "bare DDP loop", unit, target=0.98))
            if s.no_options:
                continue
            # (key, its default here): each option on against off; the default run is reused.
            options = [("optim.fused", gpu)] + [("train.channels_last", False)] * (name == "resnet") \
                + [("train.compile", False)] * (not s.quick)  # compiling takes minutes on a CPU
            for key, default in options:
                flip = [f"{key}={str(not default).lower()}"]
                other = common.best_of(s.repeat, lambda: rate("launcher", job, s, Path(tmp), flip))[0]
                on, off = (ours, other) if default else (other, ours)
                rows.append(rate_row(f"{name}: {key}=true", on, off, f"{key}=false", unit))
        first = s.models.split(",")[0]
        if s.nproc == 1 and not s.like_for_like:
            sync_ms, gate_ms = ema_gate(sizes[first], s, 10 if sizes is QUICK else 50)
            rows.append(common.row(f"{first}: train step + EMA, device gate vs host sync", round(gate_ms, 3),
                                   round(sync_ms, 3), "bool(isfinite(loss)) per step", "ms/step" if gpu else "CPU-ms/step"))
            notes.append("optim.fused defaults to true on CUDA and false on CPU; on CPU the fused case is the option.")
    common.print_rows(rows)
    name = "overhead" if s.nproc == 1 else f"overhead_{s.nproc}ranks"
    print("wrote", common.write(name, torch.device("cuda" if gpu else "cpu"), rows, quick=sizes is QUICK,
                                notes=notes))


if __name__ == "__main__":
    main()
