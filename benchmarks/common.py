"""Shared by the benchmarks: timing, device info, and the JSON every benchmark writes.

Each benchmark writes benchmarks/out/<name>.json:
{"benchmark": name, "device": ..., "date": ..., "rows": [{"case", "ours", "baseline", "baseline_name",
 "ratio", "unit", "target", "met"}]}; benchmarks/run_all.py turns them into RESULTS.md.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

OUT = Path(__file__).resolve().parent / "out"


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
