"""Evaluation and what follows from it: results, best weights, early stopping.

Used by inline validation in the training loop and by the validator process alike;
it knows nothing of either.
"""
from __future__ import annotations

import logging
import time
import traceback
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from launcher.batch import probe
from launcher.batch.memory import DeviceMemory
from launcher.batch.recovery import cleanup, is_oom
from launcher.data import eval_loader_options
from launcher.faults import simulated_limit, validation_delay
from launcher.checkpoint.export import save_weights
from launcher.precision import autocast, resolve_precision
from launcher.rundir import Best, RunDir, ValResult
from launcher.errors import ConfigError

log = logging.getLogger(__name__)


def channels_last(cfg, model: nn.Module) -> bool:
    """Conv nets evaluate NHWC: with `train.channels_last`, or when the model has a 2-d convolution."""
    return bool(cfg.train.channels_last) or any(isinstance(m, nn.Conv2d) for m in model.modules())


_LOADERS: Dict[tuple, DataLoader] = {}  # one per (dataset, batch size): its workers persist


def _loader_key(dataset: Dataset, batch_size: int, opts: dict) -> tuple:
    return id(dataset), batch_size, tuple(sorted(opts.items()))


@torch.no_grad()
def evaluate(model: nn.Module, job, dataset: Dataset, batch_size: int, device: torch.device,
             precision: str = "fp32", loader: Optional[dict] = None, nhwc: bool = False) -> Dict[str, float]:
    """Job metrics averaged over every sample of `dataset` (metrics are per-batch sums). `loader`:
    DataLoader options (data.eval_loader_options); `nhwc`: 4-d inputs become channels_last in their copy to
    the device."""
    model.eval()
    sums: Dict[str, torch.Tensor] = {}
    n = 0
    opts = loader or {"pin_memory": device.type == "cuda"}
    key = _loader_key(dataset, batch_size, opts)
    if key not in _LOADERS:
        _LOADERS[key] = DataLoader(dataset, batch_size=batch_size, shuffle=False, **opts)
    fmt = torch.channels_last if nhwc else torch.preserve_format
    for x, y in _LOADERS[key]:
        x = x.to(device, non_blocking=True, memory_format=fmt if x.ndim == 4 else torch.preserve_format)
        y = y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x)
        for k, v in job.metrics(out, y).items():
            sums[k] = sums.get(k, 0) + v.detach().float()
        n += len(x)
    return {k: float(v) / n for k, v in sums.items()}


def evaluate_fitting(model: nn.Module, job, dataset: Dataset, batch_size: int, device: torch.device,
                     precision: str, loader: dict, nhwc: bool) -> Tuple[Dict[str, float], int]:
    """`evaluate`, and the batch size it ran with: an out-of-memory error (a GPU shared with training,
    whose memory grew since the batch was chosen) empties the cache and retries with half the batch,
    which later validations keep; at batch 1 it is raised."""
    while True:
        try:
            return evaluate(model, job, dataset, batch_size, device, precision, loader, nhwc), batch_size
        except Exception as e:  # noqa: BLE001 - only an OOM is retried
            if not is_oom(e) or batch_size == 1:
                raise
            traceback.clear_frames(e.__traceback__)  # the failed frames hold activations
            detail = str(e).splitlines()[0][:160]
        _LOADERS.pop(_loader_key(dataset, batch_size, loader), None)  # its workers end with it
        cleanup(device)
        log.warning("validation out of memory at batch %d on %s (%s): retrying with batch %d",
                    batch_size, device, detail, batch_size // 2)
        batch_size //= 2


def validate_state(model: nn.Module, state: Dict[str, torch.Tensor], job, dataset: Dataset, cfg,
                   batch_size: int, device: torch.device) -> Tuple[Dict[str, float], float, float, int]:
    """Load `state` into `model` and evaluate it: (metrics, seconds, evaluation samples per second, the batch
    size it ran with: smaller than `batch_size` after an out-of-memory error, see evaluate_fitting)."""
    t0 = time.perf_counter()
    nhwc = channels_last(cfg, model)
    if nhwc:
        model.to(memory_format=torch.channels_last)  # in place; a no-op once done
    model.load_state_dict(state, strict=True)
    validation_delay(cfg.debug)
    t1 = time.perf_counter()
    metrics, batch_size = evaluate_fitting(model, job, dataset, batch_size, device,
                                           resolve_precision(cfg.validation.precision, device),
                                           eval_loader_options(cfg, device), nhwc)
    t2 = time.perf_counter()
    return metrics, t2 - t0, len(dataset) / max(t2 - t1, 1e-9), batch_size


def val_batch_size(cfg, model: nn.Module, job, dataset: Dataset, device: torch.device, start: int,
                   shared: bool = False) -> int:
    """`validation.batch_size`, or with `auto` the largest evaluation batch that fits on this device:
    probed forward-only, without gradients, like the training batch (on CPU, without a simulated
    limit, there is nothing to probe and `start` is used). `shared`: a trainer uses this GPU too, so the
    probe counts only this process's memory, within `validation.gpu_share` of the GPU (the share the
    trainer's probe left it). The probe's cached blocks are handed back afterwards."""
    if cfg.validation.batch_size != "auto":
        return int(cfg.validation.batch_size)
    if channels_last(cfg, model):  # probe the layout it will evaluate in
        model.to(memory_format=torch.channels_last)
    precision = resolve_precision(cfg.validation.precision, device)
    memory = DeviceMemory(device, cfg.validation.gpu_share, own_only=True) if shared and device.type == "cuda" \
        else None
    try:
        search = probe.probe_eval_batch(model, job, dataset, device, cfg.autobatch, start=start,
                                        amp=lambda: autocast(device, precision),
                                        simulate=simulated_limit(cfg.debug.simulate_oom_above, 0), memory=memory)
    finally:
        cleanup(device)
    if search.found == 0:
        raise ConfigError(f"validation.batch_size=auto: not even a batch of 1 fits on {device} for evaluation; "
                          "free device memory or set validation.device to another device")
    log.info("validation.batch_size=auto: %d on %s (%d probes)", search.found, device, len(search.probes))
    return search.found


def kinds(cfg) -> List[str]:
    """Which weights each validation evaluates."""
    return ["ema", "raw"] if cfg.validation.weights == "both" else [str(cfg.validation.weights)]


def fmt(metrics: Dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def best_summary(best: Optional[Best]) -> dict:
    return {"best_metric": best.metric, "best_value": best.value, "best_step": best.step} if best else {}


class Tracker:
    """Results, best weights and early stopping, rebuilt from val/results.jsonl on restart: where "best" is
    decided. `best` (best/best.json, best/model.safetensors) is the primary weights' best; `by_weights()`
    the best and final value of each kind of weights, by the same rule (a summary with both)."""

    def __init__(self, rundir: RunDir, cfg):
        self.rundir = rundir.make()
        self.metric, self.goal = cfg.validation.metric, cfg.validation.goal
        self.es = cfg.early_stop
        self.primary = "raw" if cfg.validation.weights == "raw" else "ema"
        self.best = rundir.read_best()
        results = rundir.read_results()
        self.done = {(r.step, r.weights) for r in results if r.source is None}
        self.best_of: Dict[str, Tuple[float, int]] = {}  # kind -> (value, step), live validations only
        self.final_of: Dict[str, Tuple[int, float]] = {}  # kind -> (step, value) of its latest step
        for r in results:
            self._kind(r)
        self.history = [r.metrics[self.metric] for r in results
                        if r.weights == self.primary and self.metric in r.metrics]
        self._best_smoothed, self._since_best = None, 0
        for i in range(len(self.history)):
            self._early_stop_step(self.history[: i + 1])

    def _better(self, a: float, b: Optional[float], delta: float = 0.0) -> bool:
        if b is None:
            return True
        return a > b + delta if self.goal == "max" else a < b - delta

    def _kind(self, row: ValResult) -> None:
        """The best and the final value of `row`'s weights (ties: the earlier step stays the best)."""
        if row.source is not None or self.metric not in row.metrics:
            return
        value, best = row.metrics[self.metric], self.best_of.get(row.weights)
        if best is None or self._better(value, best[0]) or (value == best[0] and row.step < best[1]):
            self.best_of[row.weights] = (value, row.step)
        if row.step >= self.final_of.get(row.weights, (-1, 0.0))[0]:
            self.final_of[row.weights] = (row.step, value)

    def by_weights(self) -> dict:
        """best_raw / best_ema ({value, step}) and final_raw / final_ema (the last step's value), side by side."""
        out = {}
        for kind in ("raw", "ema"):
            if kind in self.best_of:
                value, step = self.best_of[kind]
                out[f"best_{kind}"] = {"value": value, "step": step}
                out[f"final_{kind}"] = self.final_of[kind][1]
        return out

    def _early_stop_step(self, history: List[float]) -> bool:
        window = history[-self.es.window:]
        smoothed = sum(window) / len(window)
        if self._better(smoothed, self._best_smoothed, self.es.min_delta):
            self._best_smoothed, self._since_best = smoothed, 0
        else:
            self._since_best += 1
        return self.es.patience > 0 and self._since_best >= self.es.patience

    def record(self, row: ValResult, state: Optional[Dict[str, torch.Tensor]] = None) -> bool:
        """Append the result, update best/, and return True when early stopping says stop."""
        self.rundir.append_result(row)
        self._kind(row)
        if row.source is None:
            self.done.add((row.step, row.weights))
        if row.weights != self.primary:
            return False
        if self.metric not in row.metrics:
            log.warning("validation.metric=%r is not among the job's metrics %s", self.metric, sorted(row.metrics))
            return False
        value = row.metrics[self.metric]
        if self._better(value, None if self.best is None else self.best.value):
            self.best = Best(row.step, row.epoch, self.metric, value, row.weights)
            if state is not None:
                save_weights(self.rundir.best_weights, state, vars(self.best))
            self.rundir.write_best(self.best)
        self.history.append(value)
        return self._early_stop_step(self.history)
