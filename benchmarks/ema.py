"""EMA update time: ours (one fused foreach lerp per dtype group) against the usual ways.

Baselines, same run, same device: (a) a per-tensor Python loop as in YOLOv5's
ModelEMA, (b) torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn,
(c) the bandwidth floor 3 x EMA bytes / measured copy bandwidth (read EMA, read
weights, write EMA). Targets (H100): ours within 2x of the floor for ResNet-50,
1.3x for ViT-B/16, and at least 20x faster than the loop.

    python benchmarks/ema.py [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_rows, row, time_fn, write  # noqa: E402
from launcher.jobs.synthetic import ResNet, ViT  # noqa: E402
from launcher.ema import EMA  # noqa: E402


def yolo_update(ema_sd: dict, model: torch.nn.Module, d: float) -> None:
    """YOLOv5 ModelEMA.update: a Python loop, ~2 kernels per tensor."""
    msd = model.state_dict()
    for k, v in ema_sd.items():
        if v.dtype.is_floating_point:
            v *= d
            v += (1 - d) * msd[k].detach()


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Bytes moved per second by a device copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, iters)
    return 2 * src.numel() * 4 / t


def bench(name: str, model: torch.nn.Module, device: torch.device, iters: int) -> list:
    model = model.to(device)
    ema = EMA(model, decay=0.9999, ramp="exp", tau=2000)
    yolo_sd = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9999), use_buffers=True)
    avg.update_parameters(model)
    ema_bytes = sum(v.numel() * v.element_size() for v in ema.shadow.values() if v.is_floating_point())
    with torch.no_grad():
        t_ours = time_fn(lambda: ema.update(model), device, iters)
        t_yolo = time_fn(lambda: yolo_update(yolo_sd, model, 0.9999), device, iters)
        t_avg = time_fn(lambda: avg.update_parameters(model), device, iters)
    floor = 3 * ema_bytes / copy_bandwidth(device, max(ema_bytes, 64 << 20), iters)
    gpu = device.type == "cuda"
    floor_target = 2.0 if name.startswith("ResNet") else 1.3
    print(f"{name}: {ema_bytes / 2**20:.0f} MB EMA, {len(ema.shadow)} tensors")
    return [
        row(f"{name} EMA update vs bandwidth floor", t_ours * 1e3, floor * 1e3, "floor", "ms",
            f"<= {floor_target}x floor", (t_ours / floor <= floor_target) if gpu else None, ratio=t_ours / floor),
        row(f"{name} EMA update vs YOLOv5 loop", t_ours * 1e3, t_yolo * 1e3, "per-tensor loop", "ms",
            ">= 20x faster", (t_yolo / t_ours >= 20) if gpu else None),
        row(f"{name} EMA update vs AveragedModel", t_ours * 1e3, t_avg * 1e3, "AveragedModel", "ms"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer iterations (CI-size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    iters = 5 if args.quick else (50 if device.type == "cuda" else 15)
    rows = bench("ResNet-50 (25.6M)", ResNet(), device, iters) + bench("ViT-B/16 (86.6M)", ViT(), device, iters)
    print_rows(rows)
    print("wrote", write("ema", device, rows))


if __name__ == "__main__":
    main()
