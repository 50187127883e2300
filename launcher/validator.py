"""Evaluation, results, best weights and early stopping.

`evaluate` runs a model over a data set; `Tracker` turns each result into a line
of val/results.jsonl, keeps best/ up to date and decides early stopping. The
inline mode calls both from the training loop.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.data import DataLoader, Dataset

from launcher.files import append_jsonl, atomic_write, read_json, read_jsonl, write_json
from launcher.schema import Config

log = logging.getLogger(__name__)


def autocast(device: torch.device, precision: str):
    """`precision` is already resolved (fp32, bf16 or fp16)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


@torch.no_grad()
def evaluate(model: nn.Module, job, dataset: Dataset, batch_size: int, device: torch.device,
             precision: str = "fp32") -> Dict[str, float]:
    """Job metrics averaged over every sample of `dataset` (metrics are per-batch sums)."""
    model.eval()
    sums: Dict[str, torch.Tensor] = {}
    n = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x)
        for k, v in job.metrics(out, y).items():
            sums[k] = sums.get(k, 0) + v.detach().float()
        n += len(x)
    return {k: float(v) / n for k, v in sums.items()}


def save_weights(path: Path, state: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """A deployable safetensors file, written atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = st_save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda f: f.write(data))


class Tracker:
    """Results, best weights and early stopping, rebuilt from val/results.jsonl on restart."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.run_dir = run_dir
        self.metric, self.goal = cfg.validation.metric, cfg.validation.goal
        self.es = cfg.early_stop
        self.primary = "raw" if cfg.validation.weights == "raw" else "ema"
        (run_dir / "val").mkdir(parents=True, exist_ok=True)
        (run_dir / "best").mkdir(parents=True, exist_ok=True)
        self.results_path = run_dir / "val" / "results.jsonl"
        self.history: List[float] = []
        self.best: Optional[dict] = None
        best_json = run_dir / "best" / "best.json"
        if best_json.exists():
            self.best = read_json(best_json)
        for row in read_jsonl(self.results_path):
            if row.get("weights") == self.primary and self.metric in row.get("metrics", {}):
                self.history.append(row["metrics"][self.metric])
        self._best_smoothed, self._since_best = None, 0
        for i in range(len(self.history)):
            self._early_stop_step(self.history[: i + 1])

    def _better(self, a: float, b: Optional[float], delta: float = 0.0) -> bool:
        if b is None:
            return True
        return a > b + delta if self.goal == "max" else a < b - delta

    def _early_stop_step(self, history: List[float]) -> bool:
        window = history[-self.es.window:]
        smoothed = sum(window) / len(window)
        if self._better(smoothed, self._best_smoothed, self.es.min_delta):
            self._best_smoothed, self._since_best = smoothed, 0
        else:
            self._since_best += 1
        return self.es.patience > 0 and self._since_best >= self.es.patience

    def record(self, step: int, epoch: int, weights: str, metrics: Dict[str, float], seconds: float,
               state: Optional[Dict[str, torch.Tensor]] = None) -> bool:
        """Append the result, update best/, and return True when early stopping says stop."""
        row = {"step": step, "epoch": epoch, "weights": weights, "metrics": metrics,
               "seconds": round(seconds, 4), "time": time.time()}
        append_jsonl(self.results_path, row)
        if weights != self.primary:
            return False
        if self.metric not in metrics:
            log.warning("validation.metric=%r is not among the job's metrics %s", self.metric, sorted(metrics))
            return False
        value = metrics[self.metric]
        if self._better(value, None if self.best is None else self.best["value"]):
            self.best = {"step": step, "epoch": epoch, "metric": self.metric, "value": value, "weights": weights}
            if state is not None:
                save_weights(self.run_dir / "best" / "model.safetensors", state, self.best)
            write_json(self.run_dir / "best" / "best.json", self.best)
        self.history.append(value)
        return self._early_stop_step(self.history)


def run_validator(cfg: Config, env, run_dir: Path) -> None:
    raise NotImplementedError("the asynchronous validator is not built yet; use validation.mode=inline")


def validate_command(argv) -> int:
    print("launcher: error: `launcher validate` is not built yet", file=__import__("sys").stderr)
    return 2
