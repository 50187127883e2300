"""Validation: evaluation, results, best weights, early stopping, and the validator process.

`evaluate` runs a model over a data set; `Tracker` turns each result into a line
of val/results.jsonl, keeps best/ up to date and decides early stopping.

The validator (`serve`) claims snapshots from handoff/, evaluates them on its own
device and writes results, best/ and a stop request; it talks to the trainer only
through the run directory, so either can crash, lag or run elsewhere. It runs as
`python -m launcher validate run.dir=<dir>`: spawned by training rank 0
(mode=process), by the validator rank (mode=rank), or by hand / Slurm.

The trainer side is one object from `for_training()`: `NoValidation` (off, and
training ranks > 0), `InlineValidation` (the blocking baseline) or
`AsyncValidation` (hand-off, non-blocking result reads, drain at the end).
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.data import DataLoader, Dataset

from launcher import checkpoint, handoff
from launcher.files import JsonlTail, append_jsonl, atomic_write, read_json, read_jsonl, write_json
from launcher.schema import Config, ConfigError, check_device

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
             precision: str = "fp32", workers: int = 0) -> Dict[str, float]:
    """Job metrics averaged over every sample of `dataset` (metrics are per-batch sums)."""
    model.eval()
    sums: Dict[str, torch.Tensor] = {}
    n = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda",
                        num_workers=workers)
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
        self.done = {(r["step"], r["weights"]) for r in read_jsonl(self.results_path) if "source" not in r}
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
               state: Optional[Dict[str, torch.Tensor]] = None, **extra) -> bool:
        """Append the result, update best/, and return True when early stopping says stop."""
        row = {"step": step, "epoch": epoch, "weights": weights, "metrics": metrics,
               "seconds": round(seconds, 4), "time": time.time(), **extra}
        append_jsonl(self.results_path, row)
        if not extra:
            self.done.add((step, weights))
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



def val_batch_size(cfg: Config, model: nn.Module, job, dataset: Dataset, device: torch.device, start: int) -> int:
    """`validation.batch_size`, or with `auto` the largest evaluation batch that fits on this device:
    probed forward-only, without gradients, like the training batch (on CPU, without a simulated
    limit, there is nothing to probe and `start` is used)."""
    if cfg.validation.batch_size != "auto":
        return int(cfg.validation.batch_size)
    from launcher import autobatch

    precision = resolve_precision(cfg.validation.precision, device)
    search = autobatch.probe_eval_batch(model, job, dataset, device, cfg.autobatch, start=start,
                                        amp=lambda: autocast(device, precision),
                                        simulate=autobatch.simulated_limit(cfg.debug.simulate_oom_above, 0))
    if search.found == 0:
        raise ConfigError(f"validation.batch_size=auto: not even a batch of 1 fits on {device} for evaluation; "
                          "free device memory or set validation.device to another device")
    log.info("validation.batch_size=auto: %d on %s (%d probes)", search.found, device, len(search.probes))
    return search.found


def validate_state(model: nn.Module, state: Dict[str, torch.Tensor], job, dataset: Dataset, cfg: Config,
                   batch_size: int, device: torch.device) -> tuple[Dict[str, float], float]:
    """Load `state` into `model` and evaluate it: (metrics, seconds). Shared by inline mode and the validator."""
    t0 = time.perf_counter()
    model.load_state_dict(state, strict=True)
    if cfg.debug.val_delay_s:
        time.sleep(cfg.debug.val_delay_s)
    metrics = evaluate(model, job, dataset, batch_size, device, resolve_precision(cfg.validation.precision, device),
                       cfg.data.workers)
    return metrics, time.perf_counter() - t0


# ---------------------------------------------------------------- the validator process

def validator_device(spec: str) -> torch.device:
    check_device("validation.device", spec)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"validation.device={spec} but CUDA is not available here; use cpu or auto")
    return torch.device(spec)


class _Heartbeat:
    """validator.json, refreshed from a thread so a long evaluation does not look like a dead validator."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.step, self.state = run_dir, None, "running"
        self._stop = threading.Event()
        self._beat()
        threading.Thread(target=self._loop, name="heartbeat", daemon=True).start()

    def _beat(self) -> None:
        handoff.write_status(self.run_dir, state=self.state, pid=os.getpid(), step=self.step)

    def _loop(self) -> None:
        while not self._stop.wait(handoff.HEARTBEAT_S):
            self._beat()

    def close(self, state: str) -> None:
        self._stop.set()
        self.state = state
        self._beat()


def serve(cfg: Config, run_dir: Path, device: torch.device, revalidate: bool = False) -> int:
    """Validate hand-off snapshots until training is done and the queue is empty (or, for a
    finished run, every checkpoint). Returns the number of validations."""
    import jobs

    job = jobs.load(cfg.job)
    model = job.model().to(device)
    _, val_set = job.datasets()
    bs = val_batch_size(cfg, model, job, val_set, device, start=4 * job.cfg.batch_size)
    tracker = Tracker(run_dir, cfg)
    queue_dir = run_dir / "handoff"
    queue_dir.mkdir(parents=True, exist_ok=True)
    handoff.recover(queue_dir)  # picks up where a dead validator stopped
    parent = int(os.environ.get("LAUNCHER_PARENT_PID", 0))
    beat = _Heartbeat(run_dir)
    count = 0
    log.info("validator on %s: %s, batch %d, policy %s", device, run_dir, bs, cfg.validation.policy)
    try:
        if revalidate:
            for step in reversed(checkpoint.steps(run_dir / "checkpoints")):
                state = checkpoint.load(checkpoint.path_for(run_dir / "checkpoints", step))
                states = {"ema": state["ema"]["shadow"] if state.get("ema") else None, "raw": state["model"]}
                for kind in _kinds(cfg):
                    if states[kind] is None:
                        continue
                    beat.step = step
                    metrics, secs = validate_state(model, states[kind], job, val_set, cfg, bs, device)
                    tracker.record(step, state["epoch"], kind, metrics, secs, states[kind], source="checkpoint")
                    log.info("checkpoint %d (%s): %s", step, kind, _fmt(metrics))
                    count += 1
            beat.close("finished")
            return count
        while True:
            snap = handoff.claim(queue_dir, cfg.validation.policy)
            if snap is None:
                end = handoff.done(run_dir, or_summary=not parent)  # a spawned one never sees an old summary
                # `closed`: the trainer stopped waiting for its own validator; a standalone one drains everything.
                if end and ((end.get("closed") and parent) or not handoff.pending(queue_dir)):
                    break
                if parent and os.getppid() != parent:
                    log.warning("the process that started this validator is gone; exiting")
                    break
                time.sleep(0.05)
                continue
            beat.step = snap.step
            try:
                manifest, states = snap.load()
            except handoff.Corrupt as e:
                log.warning("snapshot %d is corrupt (%s): moved aside as .bad, skipped", snap.step, e)
                snap.reject(str(e))
                continue
            stop, rows = False, []
            for kind, state in sorted(states.items(), key=lambda kv: kv[0] == tracker.primary):
                if (snap.step, kind) in tracker.done:
                    continue  # validated just before a restart, which lost the ack
                rows.append((kind, state, *validate_state(model, state, job, val_set, cfg, bs, device)))
            for kind, state, metrics, secs in rows:  # one step's rows together, the primary (with best/) last
                stop |= tracker.record(snap.step, manifest["epoch"], kind, metrics, secs, state)
                log.info("val step %d (%s): %s [%.2fs]", snap.step, kind, _fmt(metrics), secs)
                count += 1
            snap.ack()
            if stop:
                es = cfg.early_stop
                handoff.request_stop(run_dir, snap.step, f"{cfg.validation.metric}: no improvement > {es.min_delta} "
                                     f"in {es.patience} validations (window {es.window})")
                log.info("early stopping requested at step %d", snap.step)
            if parent and (handoff.done(run_dir) or {}).get("closed"):
                break
    except BaseException:
        log.exception("validator failed")
        beat.close("failed")
        raise
    beat.close("finished")
    return count


def _kinds(cfg: Config) -> List[str]:
    return ["ema", "raw"] if cfg.validation.weights == "both" else [cfg.validation.weights]


def _fmt(metrics: Dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def spawn(run_dir: Path, device: str) -> subprocess.Popen:
    """Start `python -m launcher validate` for this run as a child process."""
    from launcher.dist import local_env_for_child

    env = local_env_for_child()
    env["LAUNCHER_PARENT_PID"] = str(os.getpid())
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "logs" / "validator-stderr.log", "ab") as err:
        # With a GPU of its own the validator needs little CPU: a lower priority keeps the data loaders
        # first. Validating on the CPU it must share the cores with training, or it never runs
        # (measured on 2 cores: at nice 10 it validated 1 of 20 snapshots, at nice 0 17 of 20).
        nice = 0 if device == "cpu" else 10
        return subprocess.Popen([sys.executable, "-m", "launcher", "validate", f"run.dir={run_dir}",
                                 f"validation.device={device}"], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: os.nice(nice))


def run_validator(cfg: Config, env, run_dir: Path) -> None:
    """The validator rank (mode=rank). The work runs in a child process, so a validator that crashes
    or is killed never fails this torchrun worker, and so never takes the training ranks down."""
    child = spawn(run_dir, str(env.device))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: child.send_signal(signum))
    rc = child.wait()
    if rc != 0:
        log.warning("the validator exited with status %d; training goes on without it", rc)
        handoff.write_status(run_dir, state="failed", pid=child.pid, returncode=rc)


def validate_command(argv: List[str]) -> int:
    """`python -m launcher validate run.dir=<dir> [overrides]`: validate a live or finished run."""
    from launcher.cli import fail, load_run_config
    from launcher.telemetry import setup_logging

    try:
        given = [a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")]
        if not given:
            raise ConfigError("validate needs run.dir=<dir>: the run directory to validate")
        run_dir = Path(given[-1]).resolve()
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"run.dir={run_dir} holds no config.yaml; point it at a run directory")
        cfg = load_run_config(run_dir, [a for a in argv if not a.startswith("run.dir=")])
        device = validator_device(cfg.validation.device)
    except ConfigError as e:
        return fail(str(e))
    spawned = "LAUNCHER_PARENT_PID" in os.environ
    setup_logging(run_dir, "validator", console=not spawned)
    finished = handoff.done(run_dir, or_summary=True) is not None
    # A finished run with nothing left in the queue: re-validate its checkpoints.
    revalidate = not spawned and finished and not handoff.pending(run_dir / "handoff") \
        and not list((run_dir / "handoff").glob("*.claimed"))
    n = serve(cfg, run_dir, device, revalidate=revalidate)
    log.info("validator done: %d validation(s)", n)
    return 0


# ---------------------------------------------------------------- the trainer's side

class NoValidation:
    """validation.mode=off, and every training rank but 0: nothing to do."""

    def submit(self, step: int, epoch: int) -> None:
        pass

    def poll(self) -> None:
        pass

    def stop_requested(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def protected_steps(self) -> List[int]:
        """Checkpoints that retention must keep: the best step's."""
        return []

    def finish(self, step: int, epoch: int) -> dict:
        return {}


def _best_summary(best: Optional[dict]) -> dict:
    return {"best_metric": best["metric"], "best_value": best["value"], "best_step": best["step"]} if best else {}


def best_by_weights(rows: List[dict], metric: str, goal: str) -> dict:
    """best_raw / best_ema ({value, step}) and final_raw / final_ema (the last step's value) from results rows."""
    out = {}
    for kind in ("raw", "ema"):
        mine = sorted((r["step"], r["metrics"][metric]) for r in rows
                      if r.get("weights") == kind and metric in r.get("metrics", {}) and "source" not in r)
        if mine:
            step, value = (max if goal == "max" else min)(mine, key=lambda sv: (sv[1], -sv[0]))
            out[f"best_{kind}"] = {"value": value, "step": step}
            out[f"final_{kind}"] = mine[-1][1]
    return out


class InlineValidation(NoValidation):
    """The classic, blocking way (kept as a baseline): evaluate inside the training loop."""

    def __init__(self, cfg: Config, run_dir: Path, job, val_set, model, ema, micro: int, device, tel):
        self.cfg, self.job, self.val_set, self.model, self.ema, self.device, self.tel = \
            cfg, job, val_set, model, ema, device, tel
        self.tracker = Tracker(run_dir, cfg)
        self.eval_model = copy.deepcopy(model)
        self.bs = val_batch_size(cfg, self.eval_model, job, val_set, device, start=4 * micro)
        self.stop, self.last = False, None

    def submit(self, step: int, epoch: int) -> None:
        for kind in _kinds(self.cfg):
            state = self.ema.shadow if kind == "ema" else self.model.state_dict()
            metrics, secs = validate_state(self.eval_model, state, self.job, self.val_set, self.cfg, self.bs,
                                           self.device)
            self.stop |= self.tracker.record(step, epoch, kind, metrics, secs, state)
            self.tel.validation({"step": step, "weights": kind, "metrics": metrics})
        self.last = step

    def stop_requested(self) -> bool:
        return self.stop

    def protected_steps(self) -> List[int]:
        return [self.tracker.best["step"]] if self.tracker.best else []

    def finish(self, step: int, epoch: int) -> dict:
        if self.last != step:
            self.submit(step, epoch)
        return _best_summary(self.tracker.best)


class AsyncValidation(NoValidation):
    """Hand snapshots to a validator elsewhere; read its results without blocking; drain at the end."""

    def __init__(self, cfg: Config, run_dir: Path, model, ema, device, tel, child: Optional[subprocess.Popen]):
        self.cfg, self.run_dir, self.model, self.ema, self.tel, self.child = cfg, run_dir, model, ema, tel, child
        self.writer = handoff.Writer(run_dir, cfg.validation.policy, cfg.validation.queue, device)
        self.results = JsonlTail(run_dir / "val" / "results.jsonl", from_end=True)
        self.skips = JsonlTail(run_dir / "val" / "skipped.jsonl", from_end=True)
        self.validated, self.skipped = set(), {}
        self.started, self.warned = time.time(), False
        self._stop, self._checked = False, 0.0

    def submit(self, step: int, epoch: int) -> None:
        states = {kind: self.ema.shadow if kind == "ema" else self.model.state_dict() for kind in _kinds(self.cfg)}
        blocked = self.writer.put(step, epoch, states)
        if blocked is not None:
            self.tel.event("handoff", step=step, blocked_ms=round(blocked * 1e3, 3))

    def alive(self) -> bool:
        if self.child is not None:
            return self.child.poll() is None
        status = handoff.read_status(self.run_dir)
        if status is None or status["time"] < self.started:
            return True  # not started yet (or a previous session's): give it the benefit of the doubt
        return status["state"] == "running" and time.time() - status["time"] < handoff.STALE_S

    def poll(self) -> None:
        """A cheap look at what the validator did since the last call (one read per file)."""
        for row in self.results.read():
            self.validated.add(row["step"])
            self.tel.validation(row)
        for row in self.skips.read():
            self.skipped[row["step"]] = row["reason"]
            self.tel.event("validation_skipped", step=row["step"], reason=row["reason"], detail=row.get("detail"))
        if not self.warned and not self.alive():
            self.warned = True
            log.warning("the validator is gone; training goes on, later snapshots stay unvalidated in %s "
                        "(`python -m launcher validate run.dir=%s` picks them up)", self.run_dir / "handoff",
                        self.run_dir)
            self.tel.event("validator_down", returncode=self.child.poll() if self.child else None)

    def stop_requested(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= 0.2:  # at most a few stat() calls a second, whatever the step rate
            self._checked, self._stop = now, handoff.stop_requested(self.run_dir)
        return self._stop

    def flush(self) -> None:
        self.writer.flush()

    def protected_steps(self) -> List[int]:
        """The best so far, and every step not validated yet: it may still become the best."""
        self.poll()
        best = _read_best(self.run_dir)
        waiting = [s for s in self.writer.submitted if s not in self.validated and s not in self.skipped]
        return ([best["step"]] if best else []) + waiting

    def finish(self, step: int, epoch: int) -> dict:
        """Drain: the final weights are handed off and, within drain_timeout_s, validated."""
        t0 = time.perf_counter()
        if not self.writer.submitted or self.writer.submitted[-1] != step:
            self.submit(step, epoch)
        self.writer.flush()
        handoff.mark_done(self.run_dir, step)
        deadline = time.monotonic() + self.cfg.validation.drain_timeout_s
        while not handoff.settled(self.run_dir / "handoff", step) and self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        handoff.mark_done(self.run_dir, step, closed=True)
        self.warned = self.warned or self.alive()  # a validator that exits now simply finished
        if self.child is not None:
            try:
                self.child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.child.terminate()
                self.child.wait()
        # Retention again, now that the results are in: last K, the true best, what is still unvalidated.
        checkpoint.prune(self.run_dir / "checkpoints", self.cfg.checkpoint.keep_last, self.protected_steps())
        blocked = [b * 1e3 for b in self.writer.blocked_s] or [0.0]
        return {**_best_summary(_read_best(self.run_dir)),
                "validated_steps": len(self.validated & set(self.writer.submitted)),
                "unvalidated_steps": [s for s in self.writer.submitted
                                      if s not in self.validated and self.skipped.get(s) != "stale"],
                "stale_steps": [s for s in self.writer.submitted if self.skipped.get(s) == "stale"],
                "handoff_blocked_ms": {"mean": round(sum(blocked) / len(blocked), 3), "max": round(max(blocked), 3)},
                "drain_s": round(time.perf_counter() - t0, 2)}


def _read_best(run_dir: Path) -> Optional[dict]:
    try:
        return read_json(run_dir / "best" / "best.json")
    except (OSError, ValueError):
        return None


def child_device(env) -> str:
    """mode=process: the validator's own GPU if the node has one no training rank uses, else the same device."""
    if env.device.type == "cuda" and torch.cuda.device_count() > env.local_world_size:
        return f"cuda:{env.local_world_size}"
    return str(env.device)


def for_training(cfg: Config, env, run_dir: Path, job, val_set, model, ema, micro: int, tel) -> NoValidation:
    from launcher.env import validation_mode

    mode = validation_mode(cfg.validation.mode, env.world_size)
    if not env.is_main or mode == "off":
        return NoValidation()
    if mode == "inline":
        return InlineValidation(cfg, run_dir, job, val_set, model, ema, micro, env.device, tel)
    child = spawn(run_dir, child_device(env)) if mode == "process" else None  # rank/external: started elsewhere
    return AsyncValidation(cfg, run_dir, model, ema, env.device, tel, child)
