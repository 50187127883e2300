"""Where numbers go: metrics.jsonl, events.jsonl, logs, progress, wandb, NVML.

Only rank 0 of the training group writes run files; every other rank gets the
same object with `enabled=False`, whose methods do nothing, so the training loop
never branches on rank to log. Each destination is a small sink with a no-op twin
(`_Off`), chosen once in `Telemetry.__init__`:

- progress: a rich bar on a TTY, plain `key=value` lines otherwise (Slurm, CI);
- wandb: rank 0 only, offline unless an API key exists, the run id kept in the
  run directory and the checkpoint so a resume continues the same run; any wandb
  failure warns once and turns the sink off, it never stops training;
- GPU telemetry: a daemon thread polls NVML every `logger.telemetry.every_s`; the
  loop only takes the aggregated samples when it logs, so NVML never sits on the
  hot path. No driver or library: one info line, then nothing.

Validation results come from val/results.jsonl, whoever wrote them (inline in the
loop or a separate validator): `files.JsonlTail` reads the new complete lines from a
remembered offset at each logging step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import netrc
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from launcher.files import JsonlTail, append_jsonl, atomic_write, read_json, truncate_jsonl

log = logging.getLogger("launcher")
plog = logging.getLogger("launcher.progress")


class _ConsoleFilter(logging.Filter):
    """Records logged with extra={"console": False} go to the log file only (rich bar / progress=off)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


def setup_logging(run_dir: Optional[Path], rank: int, console: bool = True) -> None:
    """Per-rank file log in logs/rank-<r>.log; only rank 0 (or a lone process) talks on the console."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / f"rank-{rank}.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if console:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh.setLevel(logging.INFO)
        sh.addFilter(_ConsoleFilter())
        root.addHandler(sh)


class _Off:
    """The no-op sink: any method call does nothing and returns None."""

    def __getattr__(self, name: str):
        return lambda *a, **k: None


OFF = _Off()


def _fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(row: dict, total: int, eta_s: Optional[float], last_val: Optional[dict]) -> str:
    """One `train key=value ...` line: grep-able in Slurm logs, parseable with str.split('=')."""
    parts = [f"step={row['step']}/{total}", f"epoch={row['epoch']}"]
    for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.3e}"), ("samples_per_s", "{:.1f}")):
        if key in row:
            parts.append(f"{key}=" + fmt.format(row[key]))
    parts.append(f"eta={_fmt_eta(eta_s)}")
    if last_val:
        parts.append(f"val_{last_val['metric']}={last_val['value']:.4f}@{last_val['step']}")
    return "train " + " ".join(parts)


class PlainProgress:
    """Periodic log lines; `console=False` keeps them in logs/rank-0.log only (progress=off)."""

    def __init__(self, total: int, console: bool = True):
        self.total, self.console = total, console

    def update(self, row: dict, eta_s: Optional[float], last_val: Optional[dict]) -> None:
        plog.info(progress_line(row, self.total, eta_s, last_val), extra={"console": self.console})

    def close(self) -> None:
        pass


class RichProgress(PlainProgress):
    """A rich bar on the console (the same line still goes to the log file)."""

    def __init__(self, total: int):
        super().__init__(total, console=False)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
        self.task = self.bar.add_task("train", total=total, epoch=0, info="")
        self.bar.start()
        # Console log lines go through rich's stdout proxy, so they print above the bar, not through it.
        self.handlers = [h for h in logging.getLogger().handlers
                         if type(h) is logging.StreamHandler and h.stream is sys.__stdout__]
        self.streams = [h.setStream(sys.stdout) for h in self.handlers]

    def update(self, row: dict, eta_s: Optional[float], last_val: Optional[dict]) -> None:
        super().update(row, eta_s, last_val)
        info = f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row.get('samples_per_s', 0):.0f} samples/s"
        if last_val:
            info += f" | val {last_val['metric']} {last_val['value']:.4f} @ {last_val['step']}"
        self.bar.update(self.task, completed=row["step"], epoch=row["epoch"], info=info)

    def close(self) -> None:
        self.bar.stop()
        for h, stream in zip(self.handlers, self.streams):
            h.setStream(stream)


def make_progress(mode: str, total: int, isatty: Optional[bool] = None):
    isatty = sys.stdout.isatty() if isatty is None else isatty
    if mode == "rich" or (mode == "auto" and isatty):
        try:
            return RichProgress(total)
        except Exception as e:  # a broken terminal must not stop training
            log.info("progress: rich bar unavailable (%s); plain lines instead", e)
    return PlainProgress(total, console=mode != "off")


# ----------------------------------------------------------------------------------------------- GPU


def _nvml_uuid(torch_uuid: Any) -> str:
    text = str(torch_uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


class GpuMonitor:
    """NVML samples of the given CUDA devices, taken by a daemon thread and aggregated per log step.

    Devices are mapped by UUID (torch's view -> NVML handle): NVML ignores
    CUDA_VISIBLE_DEVICES and may order GPUs differently from CUDA.
    """

    def __init__(self, nvml, handles: Dict[int, Any], uuids: Dict[int, str], every_s: float):
        self.nvml, self.handles, self.uuids, self.every_s = nvml, handles, uuids, every_s
        self.samples: List[Dict[int, dict]] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nvml-telemetry", daemon=True)
        self.thread.start()

    @classmethod
    def start(cls, cuda_indices: List[int], every_s: float):
        """A running monitor, or OFF with one info line saying why (no driver, no library, no GPU)."""
        if every_s <= 0:
            return OFF
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded, ImportError
            log.info("telemetry: NVML not available (%s); GPU telemetry off", e)
            return OFF
        if not cuda_indices:
            log.info("telemetry: this run uses no CUDA device; GPU telemetry off")
            return OFF
        try:
            import torch

            handles, uuids = {}, {}
            for i in cuda_indices:
                uuid = _nvml_uuid(torch.cuda.get_device_properties(i).uuid)
                handles[i] = pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
                uuids[i] = uuid
        except Exception as e:
            log.info("telemetry: cannot map CUDA devices to NVML (%s); GPU telemetry off", e)
            return OFF
        log.info("telemetry: sampling %d GPU(s) every %.1fs: %s", len(handles), every_s, ", ".join(uuids.values()))
        return cls(pynvml, handles, uuids, every_s)

    def _sample(self) -> Dict[int, dict]:
        nv, out = self.nvml, {}
        for i, h in self.handles.items():
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            row = {"util": float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
                   "mem_used_gb": mem.used / 2**30, "mem_total_gb": mem.total / 2**30}
            try:
                row["power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
                row["temp_c"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            except nv.NVMLError:  # not supported on every board (e.g. some MIG slices)
                pass
            out[i] = row
        return out

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                sample = self._sample()
            except Exception as e:
                log.warning("telemetry: NVML sampling failed (%s); GPU telemetry off from here", e)
                return
            with self.lock:
                self.samples.append(sample)
            self.stop_event.wait(self.every_s)

    def take(self) -> Optional[List[dict]]:
        """Per GPU since the last call: mean utilization and power, peak memory, last temperature."""
        with self.lock:
            samples, self.samples = self.samples, []
        if not samples:
            return None
        rows = []
        for i in self.handles:
            seq = [s[i] for s in samples if i in s]
            row = {"index": i, "uuid": self.uuids[i], "util": sum(r["util"] for r in seq) / len(seq),
                   "mem_used_gb": max(r["mem_used_gb"] for r in seq), "mem_total_gb": seq[-1]["mem_total_gb"]}
            if "power_w" in seq[-1]:
                row["power_w"] = sum(r.get("power_w", 0.0) for r in seq) / len(seq)
                row["temp_c"] = seq[-1]["temp_c"]
            rows.append(row)
        return rows

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=5)
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


def node_cuda_indices(env: Any, cfg: Any) -> List[int]:
    """The CUDA devices of this node's ranks as rank 0 sees them: trainers, a validator rank, and the next
    GPU for a lone trainer's validator process (it takes its own GPU when one is free)."""
    if env is None or getattr(env.device, "type", "cpu") != "cuda":
        return []
    import torch

    extra = int(env.world_size == 1 and cfg.validation.mode in ("auto", "process"))
    return list(range(min(max(env.local_world_size, 1) + extra, torch.cuda.device_count())))


# --------------------------------------------------------------------------------------------- wandb


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_run_id(run_dir: Path, fallback: Optional[str] = None) -> str:
    """The run's wandb id: kept in <run_dir>/wandb_id (else the checkpoint's, else a new one)."""
    path = run_dir / "wandb_id"
    if path.exists():
        return path.read_text().strip()
    run_id = fallback or secrets.token_hex(4)
    atomic_write(path, lambda f: f.write(run_id + "\n"), mode="w")
    return run_id


class WandbSink:
    """One wandb run for the whole training run; every call is guarded: a failure warns once, then off."""

    def __init__(self, run, mode: str):
        self.run, self.mode = run, mode
        run.define_metric("trainer/step")
        for prefix in ("train/*", "gpu/*", "event/*"):
            run.define_metric(prefix, step_metric="trainer/step")
        run.define_metric("val/step")
        run.define_metric("val/*", step_metric="val/step")

    @classmethod
    def start(cls, run_dir: Path, wcfg: Any, run_id: str, config: dict):
        if wcfg.mode == "disabled":
            return OFF
        mode = wcfg.mode
        if mode == "online" and not _has_api_key():
            log.warning("wandb: no API key (WANDB_API_KEY or ~/.netrc); logging offline instead")
            mode = "offline"
        try:
            import wandb
        except Exception as e:
            log.warning("wandb: cannot import wandb (%s); training goes on without it", e)
            return OFF
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                run = wandb.init(mode=attempt, dir=str(run_dir), id=run_id, resume="allow", project=wcfg.project,
                                 entity=wcfg.entity, name=wcfg.name or run_dir.name, group=wcfg.group,
                                 tags=list(wcfg.tags) or None, config=config,
                                 settings=wandb.Settings(console="off", init_timeout=90, silent=True))
                log.info("wandb: %s run %s in %s", attempt, run_id, run_dir / "wandb")
                return cls(run, attempt)
            except Exception as e:
                log.warning("wandb: init (%s) failed: %s", attempt, e)
        log.warning("wandb: off for this run; metrics.jsonl still has everything")
        return OFF


class Telemetry:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int = 0, cfg: Any = None, env: Any = None):
        self.run_dir, self.enabled, self.total_steps, self.cfg = run_dir, enabled, total_steps, cfg
        self.step, self.first = 0, None  # (time, step) of the first logged row, for the ETA
        self.last_val: Optional[dict] = None
        self._wandb, self._wandb_started, self._resume_id, self._id = OFF, False, None, None
        self.progress, self.gpus, self.results = OFF, OFF, None
        if not enabled:
            return
        self.results = JsonlTail(run_dir / "val" / "results.jsonl", from_end=True)
        if cfg is None:
            self.progress = PlainProgress(total_steps)
            return
        self.progress = make_progress(cfg.logger.progress, total_steps)
        self.gpus = GpuMonitor.start(node_cuda_indices(env, cfg), cfg.logger.telemetry.every_s)

    # wandb starts on first use, so that a resume can hand over the checkpoint's run id first.
    @property
    def wandb_id(self) -> Optional[str]:
        """For the checkpoint: the wandb run id (None when wandb is off)."""
        if not self.enabled or self.cfg is None or self.cfg.logger.wandb.mode == "disabled":
            return None
        if self._id is None:
            self._id = wandb_run_id(self.run_dir, self._resume_id)
        return self._id

    @property
    def wandb(self):
        if not self._wandb_started and self.wandb_id is not None:
            self._wandb_started = True
            config = dataclasses.asdict(self.cfg) if dataclasses.is_dataclass(self.cfg) else dict(self.cfg)
            self._wandb = WandbSink.start(self.run_dir, self.cfg.logger.wandb, self.wandb_id, config)
        return self._wandb

    def _guard(self, fn) -> None:
        """Call into wandb; the first failure warns once and turns wandb off."""
        sink = self.wandb
        if sink is OFF:
            return
        try:
            fn(sink.run)
        except Exception as e:
            log.warning("wandb: logging failed (%s); wandb off for the rest of this run", e)
            self._wandb = OFF

    def truncate_after(self, step: int, wandb_id: Optional[str] = None) -> None:
        """On resume: forget what was logged past the checkpoint, so it is logged once; adopt its wandb id."""
        if self.enabled:
            self._resume_id = wandb_id
            truncate_jsonl(self.run_dir / "metrics.jsonl", lambda r: r.get("step", 0) <= step)

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        gpus = self.gpus.take()
        if gpus:
            row = {**row, "gpu": gpus}
        append_jsonl(self.run_dir / "metrics.jsonl", row)
        self.step = row["step"]
        now = time.time()
        if self.first is None:
            self.first = (now, row["step"])
        eta = None
        if row["step"] > self.first[1]:
            eta = (now - self.first[0]) / (row["step"] - self.first[1]) * (self.total_steps - row["step"])
        self._poll_validation()
        self.progress.update(row, eta, self.last_val)
        flat = {f"train/{k}": v for k, v in row.items() if k not in ("step", "time", "gpu")}
        for g in gpus or []:
            flat.update({f"gpu/{g['index']}/{k}": v for k, v in g.items() if k not in ("index", "uuid")})
        self._guard(lambda run: run.log({"trainer/step": row["step"], **flat}))

    def _poll_validation(self) -> None:
        """Log the validations that arrived since the last call (inline or from the validator)."""
        rows = self.results.read() if self.results else []
        if not rows:
            return
        metric, primary = (self.cfg.validation.metric, "raw" if self.cfg.validation.weights == "raw" else "ema") \
            if self.cfg is not None else (None, None)
        by_step: Dict[int, dict] = {}  # raw and EMA of one step side by side in one wandb row
        for r in rows:
            by_step.setdefault(r["step"], {}).update(
                {f"val/{r['weights']}/{k}": v for k, v in r.get("metrics", {}).items()})
            if metric in r.get("metrics", {}) and r["weights"] == primary:
                self.last_val = {"metric": f"{r['weights']}_{metric}", "value": r["metrics"][metric],
                                 "step": r["step"]}
        for step, values in by_step.items():
            self._guard(lambda run: run.log({"val/step": step, **values}))
        try:
            best = read_json(self.run_dir / "best" / "best.json")
            self._guard(lambda run: run.summary.update({f"best/{best['metric']}": best["value"],
                                                         "best/step": best["step"], "best/weights": best["weights"]}))
        except (OSError, ValueError, KeyError):
            pass

    def event(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        append_jsonl(self.run_dir / "events.jsonl", {"event": kind, "time": time.time(), **fields})
        log.info("event %s %s", kind, fields)
        numbers = {f"event/{kind}/{k}": v for k, v in fields.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if kind in ("start", "resume", "end") or "oom" in kind or "autobatch" in kind:
            self._guard(lambda run: run.log({"trainer/step": self.step, **numbers}))

    def validation(self, row: dict) -> None:
        if not self.enabled:
            return
        metrics = " ".join(f"{k}={v:.4f}" for k, v in row["metrics"].items())
        log.info(f"val step={row['step']} weights={row['weights']} {metrics}")  # wandb: read at the next log

    def close(self) -> None:
        if not self.enabled:
            return
        self._poll_validation()
        self.gpus.close()
        self.progress.close()
        sink = self._wandb
        if sink is OFF:
            return
        try:
            summary = read_json(self.run_dir / "summary.json")
            sink.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})
        except (OSError, ValueError):
            pass
        try:
            sync_dir = sink.run.settings.sync_dir
            sink.run.finish()
            if sink.mode == "offline":
                log.info("wandb: offline run saved; upload it with: wandb sync %s", sync_dir)
        except Exception as e:
            log.warning("wandb: finishing the run failed (%s)", e)
        self._wandb = OFF
