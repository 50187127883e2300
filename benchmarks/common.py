"""Shared by the benchmarks: timing, device info, and the JSON every benchmark writes.

Each benchmark writes $BENCH_OUT/<name>.json (default benchmarks/out/; run_all.py --out-dir sets it):
{"benchmark": name, "device": ..., "date": ..., "rows": [{"case", "ours", "baseline", "baseline_name",
 "ratio", "unit", "target", "met"}]}; benchmarks/run_all.py turns them into RESULTS.md.
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("BENCH_OUT") or ROOT / "benchmarks" / "out")
sys.path.insert(0, str(ROOT))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def row(case: str, ours: float, baseline: float, baseline_name: str, unit: str, target: Optional[str] = None,
        met: Optional[bool] = None, ratio: Optional[float] = None) -> dict:
    return {"case": case, "ours": ours, "baseline": baseline, "baseline_name": baseline_name,
            "ratio": ratio if ratio is not None else (baseline / ours if ours else None), "unit": unit,
            "target": target, "met": met}


def write(name: str, device: torch.device, rows: List[dict], **extra) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    data = {"benchmark": name, "device": device_name(device), "date": datetime.date.today().isoformat(),
            "rows": rows, **extra}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def print_rows(rows: List[dict]) -> None:
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        met = {True: "met", False: "NOT met", None: ""}[r["met"]]
        print(f"{r['case']:<42} ours {r['ours']:.4g} {r['unit']:<6} {r['baseline_name']} {r['baseline']:.4g}"
              f"  ratio {ratio}  {r['target'] or ''} {met}")


# Running the launcher (or a baseline) as a user would: a subprocess, timed from outside.

def best_of(repeat: int, *measures):
    """Run each measurement `repeat` times, interleaved, and keep each one's best (largest)
    value: other load on the machine only ever slows a run down, so the best is the least
    disturbed, and interleaving exposes both sides to the same drift."""
    best = [None] * len(measures)
    for _ in range(repeat):
        for i, measure in enumerate(measures):
            v = measure()
            best[i] = v if best[i] is None else max(best[i], v)
    return best


def env() -> dict:
    """The child's environment: this checkout importable, no inherited torchrun identity."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("WANDB_MODE", "offline")
    e["WANDB_SILENT"] = "true"
    if not torch.cuda.is_available():  # on a shared CPU, 2+ threads per process thrash: one each
        e.setdefault("OMP_NUM_THREADS", "1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        e.pop(k, None)
    return e


def python_cmd(nproc: int, *target: str) -> List[str]:
    """`python <target>` for one process, torchrun for several (target: '-m', 'launcher' or a script)."""
    if nproc <= 1:
        return [sys.executable, *target]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
            *target]


def run(cmd: List[str], timeout: float = 1800) -> float:
    """Run to completion; returns the CPU seconds it and its descendants used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process and all its descendants, from /proc (Linux)."""
    total, stack = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def launcher_window(cmd: List[str], metrics_path: Path, warmup: int, last: int, global_batch: int,
                    timeout: float = 1800, root: Path = ROOT) -> dict:
    """Run a `launcher train` command and time its steady state: from the first logged step
    >= warmup to the logged step `last`, both in wall seconds (from metrics.jsonl, each row
    follows a device sync) and in CPU seconds of the whole process tree (sampled when the row
    appears; on a shared CPU, wall time measures the neighbours, CPU time does not). `root`: the
    checkout whose launcher runs (another one: a previous version, measured in the same run)."""
    from launcher.files import read_jsonl

    child = dict(env(), PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=root, env=child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks: dict = {}
    t_end = time.time() + timeout
    while proc.poll() is None and len(marks) < 2 and time.time() < t_end:
        time.sleep(0.005)
        rows = [r for r in read_jsonl(metrics_path) if r["step"] >= warmup] if metrics_path.exists() else []
        for key, r in (("first", rows[0] if rows else None), ("last", rows[-1] if rows else None)):
            if r is not None and key not in marks and (key == "first" or r["step"] >= last):
                marks[key] = (r, cpu_seconds(proc.pid))
    out, _ = proc.communicate(timeout=max(1.0, t_end - time.time()))
    if proc.returncode != 0 or len(marks) < 2:
        raise RuntimeError(f"{' '.join(cmd)}\nexit {proc.returncode}, marks {list(marks)}\n{out[-4000:]}")
    (r0, c0), (r1, c1) = marks["first"], marks["last"]
    samples = (r1["step"] - r0["step"]) * global_batch
    return {"wall_rate": samples / (r1["time"] - r0["time"]), "cpu_rate": samples / max(c1 - c0, 1e-9),
            "steps": r1["step"] - r0["step"]}
