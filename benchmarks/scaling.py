"""How throughput grows with training ranks: `launcher train` on 1 and N ranks (gloo on a
CPU, NCCL on GPUs), the same per-rank batch, validation off so every rank trains; then
the DDP bucket settings on N ranks.

    python benchmarks/scaling.py --quick     # CPU: 1 and 2 ranks, tiny ResNet
    python benchmarks/scaling.py             # GPUs: 1 and all visible GPUs, ResNet-50 bf16

Writes benchmarks/out/scaling.json. Model (RESULTS.md): a step on N ranks costs
t(N) = t_compute + t_exposed_allreduce(N), so samples/s(N) = N * B / t(N); a ring
all-reduce moves 2 (N-1)/N x gradient bytes per rank, mostly hidden behind backward.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import common
from overhead import FULL, QUICK, job_overrides, rate_row


def measure(job: dict, s: argparse.Namespace, nproc: int, tmp: Path, extra=()) -> dict:
    run_dir = tmp / f"run-{time.monotonic_ns()}"
    cmd = common.python_cmd(nproc, "-m", "launcher", "train", *job_overrides(job), f"run.dir={run_dir}",
                            f"batch.size={s.batch}", f"train.max_steps={s.steps}", f"train.precision={s.precision}",
                            f"train.log_every={s.log_every}", f"data.workers={s.workers}", "validation.mode=off",
                            "ema.enabled=true", "checkpoint.every_steps=0", "logger.progress=plain", *extra)
    w = common.launcher_window(cmd, run_dir / "metrics.jsonl", s.warmup, s.steps, s.batch * nproc)
    w["steps_per_s"] = w["wall_rate"] / (s.batch * nproc)
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU/CI sizes")
    ap.add_argument("--ranks", type=int, default=0, help="the larger rank count (default: 2 on CPU, all GPUs)")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats; the best of each is kept")
    s = ap.parse_args()
    gpu = torch.cuda.is_available()
    n = s.ranks or (torch.cuda.device_count() if gpu else 2)
    quick = s.quick or not gpu
    job = (QUICK if quick else FULL)["resnet"]
    s.batch, s.steps, s.warmup, s.log_every = (16, 50, 10, 5) if quick else (128, 120, 20, 10)
    s.precision, s.workers = ("bf16", 8) if gpu else ("fp32", 0)
    with tempfile.TemporaryDirectory() as tmp:
        best = common.best_of(s.repeat, lambda: measure(job, s, 1, Path(tmp))["wall_rate"],
                              lambda: measure(job, s, n, Path(tmp))["wall_rate"],
                              lambda: measure(job, s, 1, Path(tmp))["cpu_rate"],
                              lambda: measure(job, s, n, Path(tmp))["cpu_rate"])
        wall1, walln, cpu1, cpun = best
        rows = [rate_row(f"steps/s, {n} ranks vs 1 rank", walln / (s.batch * n), wall1 / s.batch, "1 rank", "steps/s"),
                rate_row(f"samples/s, {n} ranks vs 1 (ideal {n})", walln, wall1, "1 rank", "samples/s"),
                rate_row(f"samples per CPU-second, {n} ranks vs 1 (ideal 1)", cpun, cpu1, "1 rank", "samples/CPU-s")]
        if n > 1:
            kind = "wall_rate" if gpu else "cpu_rate"
            unit = "samples/s" if gpu else "samples/CPU-s"
            ddp_sync = ["autobatch.max_retries=0"]  # DDP syncs in backward (overlapped) only without OOM recovery
            mine, recovery = common.best_of(s.repeat, lambda: measure(job, s, n, Path(tmp), ddp_sync)[kind],
                                            lambda: measure(job, s, n, Path(tmp))[kind])
            rows.append(rate_row(f"{n} ranks: DDP's overlapped sync (autobatch.max_retries=0)", mine, recovery,
                                 "OOM recovery on (all-reduce after backward)", unit))
            for key, default in (("ddp.gradient_as_bucket_view", True), ("ddp.static_graph", False)):
                flip = ddp_sync + [f"{key}={str(not default).lower()}"]
                other = common.best_of(s.repeat, lambda: measure(job, s, n, Path(tmp), flip)[kind])[0]
                on, off = (mine, other) if default else (other, mine)
                rows.append(rate_row(f"{n} ranks, max_retries=0: {key}=true", on, off, f"{key}=false", unit))
    notes = [f"{'CPU gloo' if not gpu else 'NCCL'}, ResNet ({'tiny' if quick else '50'}), batch {s.batch} per rank, "
             f"{s.precision}, EMA on, validation off, {s.steps} steps timed after step {s.warmup}",
             "wall-clock rates on a shared CPU include other load"]
    common.print_rows(rows)
    print("wrote", common.write("scaling", torch.device("cuda" if gpu else "cpu"), rows, quick=quick, notes=notes))


if __name__ == "__main__":
    main()
