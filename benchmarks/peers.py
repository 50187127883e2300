"""Ahead of the peers, measured side by side (issue 26): the same task, recipe, hardware and number of
processes through the launcher, PyTorch Lightning, HF Accelerate and a plain PyTorch loop.

    python benchmarks/peers.py                          # CPU: both tasks, best of 3 interleaved rounds
    python benchmarks/peers.py --quick                  # CI sizes, one round (a few minutes on 2 cores)
    python benchmarks/peers.py --device cuda --nproc 1  # one GPU: everyone trains on it, the launcher's
                                                        # validator process shares it
    python benchmarks/peers.py --device cuda --nproc 2 --launcher-layout rank   # 2 GPUs for everyone: the
                                                        # launcher trains on 1 (batch 128), validates on the other
    python benchmarks/peers.py --device cuda --nproc 8  # 8 GPUs: 512 does not split over 7 trainers, so the
                                                        # launcher trains on 8 with its validator rank sharing one
    pip install -e ".[peers]"                           # the pinned peers (a missing one is reported, skipped)

Systems (each a subprocess, timed from outside, interleaved round by round):
- launcher: `launcher train` with its defaults: EMA, asynchronous validation every epoch (a validator
  process beside one training process, the validator rank with several), checkpoints at every
  validation and every `checkpoint.every_steps`. Wandb is disabled (no peer logs to wandb).
- lightning, accelerate, plain: benchmarks/peers/*.py. The recipe (model, data, AdamW, schedule, batch,
  epochs, EMA decay and ramp, validation batch, checkpoint cadence) is read from the launcher's composed
  config (`launcher train --cfg job`) and handed to them as JSON; each validates the EMA inline every
  epoch and checkpoints at the same cadence (see benchmarks/peers/recipe.py).

Tasks: `mnist1d`, the MNIST-1D CNN recipe (the question: the same final EMA accuracy in how much wall
time) and `val-heavy`, the synthetic job (a small ResNet, random images) with a validation set a quarter
of the training set, validated every epoch, where a blocking validation shows.

Per system: wall time from launch to exit, training time (first step to the end, from the run's own
records), the training process's CPU time from the first to the last logged step (on one CPU core, what
that span takes whatever the machine's load), training throughput between validations (the median over
windows of `log_every` steps, so a window holding a validation or a checkpoint drops out), the training
loop's stall per validation and per checkpoint, the final and best EMA metric, and the CPU time of the
whole process tree. On this 2-core CPU every training process runs one
thread (OMP_NUM_THREADS=1); the launcher's validator process takes the second core, the peers validate
inline. Ratios compare each peer with the launcher of the same round: > 1 means the launcher is better
(peer time / launcher time, launcher rate / peer rate, launcher metric / peer metric). Writes
$BENCH_OUT/peers.json (benchmarks/common.py's convention) and peers.md (the tables for RESULTS.md).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
import yaml

import common

PEERS = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(PEERS))
import recipe as peer_recipe  # noqa: E402

SCRIPTS = {"lightning": "lightning_task.py", "accelerate": "accelerate_task.py", "plain": "plain_ddp.py"}
LABELS = {"launcher": "launcher", "lightning": "PyTorch Lightning", "accelerate": "HF Accelerate",
          "plain": "plain PyTorch loop"}
NEEDS = {"lightning": ["lightning"], "accelerate": ["accelerate", "timm"], "plain": ["timm"]}
_RESNET_SMALL = ["job.width=8", "job.depth=[1,1,1,1]", "job.image_size=32", "job.num_classes=10"]
TASKS = {  # launcher overrides per size; everything else is the launcher's default
    "mnist1d": {"quick": ["train.epochs=3"], "cpu": [], "gpu": []},
    "val-heavy": {
        "quick": ["job=synthetic", *_RESNET_SMALL, "job.train_samples=512", "job.val_samples=128", "train.epochs=2"],
        "cpu": ["job=synthetic", *_RESNET_SMALL, "job.train_samples=4096", "job.val_samples=1024", "train.epochs=8"],
        "gpu": ["job=synthetic", "job.image_size=128", "job.train_samples=16384", "job.val_samples=4096",
                "train.epochs=4", "data.workers=8"]},
}
FIXED = ["logger.wandb.mode=disabled", "logger.progress=plain"]


def jsonl(path: Path) -> List[dict]:
    """Every complete line of a JSON-lines file (a torn last line is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(device: str) -> dict:
    e = common.env()
    if device == "cpu":  # one thread per training process, no GPU even where there is one
        e["CUDA_VISIBLE_DEVICES"] = ""
        e.setdefault("OMP_NUM_THREADS", "1")
    return e


def launcher_config(overrides: List[str], env: dict) -> dict:
    """The launcher's composed config for these overrides (Hydra's `--cfg job`)."""
    out = subprocess.run([sys.executable, "-m", "launcher", "train", *overrides, "--cfg", "job"], cwd=common.ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"peers: `launcher train {' '.join(overrides)} --cfg job` failed: {out.stderr.strip()[-500:]}")
    return yaml.safe_load(out.stdout)


MODELLED = {  # the launcher's keys the peers' recipe reproduces, and only at these values
    "optim.name": lambda v: v == "adamw", "ema.enabled": lambda v: v is True, "ema.ramp": lambda v: v == "exp",
    "ema.every": lambda v: v == 1, "validation.every_steps": lambda v: v == 0,
    "validation.every_epochs": lambda v: v == 1, "validation.weights": lambda v: v == "ema",
    "batch.size": lambda v: isinstance(v, int), "batch.global_size": lambda v: v is None,
    "train.max_steps": lambda v: v == 0}


def make_recipe(cfg: dict, device: str, nproc: int) -> dict:
    """The peers' recipe: the launcher's config for the task, for `nproc` training processes. `ema.tau`
    unset is the launcher's documented auto rule, T / ln(0.05 T) for T updates (checked against the
    `ema_tau` of its summary after each run)."""
    def get(key: str):
        node = cfg
        for part in key.split("."):
            node = node[part]
        return node

    unsupported = [f"{key}={get(key)}" for key, ok in MODELLED.items() if not ok(get(key))]
    if unsupported:
        raise SystemExit(f"peers: the peers' recipe does not model {', '.join(unsupported)}; update benchmarks/peers/")
    train_len = len(peer_recipe.make_job(SimpleNamespace(job=cfg["job"])).datasets()[0])
    steps_per_epoch = train_len // nproc // get("batch.size")
    total = steps_per_epoch * get("train.epochs")
    tau = get("ema.tau") or max(1.0, total / max(1.0, math.log(max(1.0, 0.05 * total))))
    return {"job": cfg["job"], "seed": get("run.seed"), "epochs": get("train.epochs"), "batch": get("batch.size"),
            "steps_per_epoch": steps_per_epoch, "total_steps": total, "lr": get("optim.lr"),
            "weight_decay": get("optim.weight_decay"), "betas": [get("optim.momentum"), get("optim.beta2")],
            "eps": get("optim.eps"), "min_lr": get("sched.min_lr"),
            "warmup_steps": get("sched.warmup_steps") or round(get("sched.warmup_epochs") * steps_per_epoch),
            "ema_decay": get("ema.decay"), "ema_tau": tau, "val_batch": int(get("validation.batch_size")),
            "metric": get("validation.metric"), "goal": get("validation.goal"),
            "ckpt_every": get("checkpoint.every_steps"), "keep_last": get("checkpoint.keep_last"),
            "log_every": get("train.log_every"), "workers": get("data.workers"), "device": device,
            "precision": "bf16" if device == "cuda" else "fp32"}


def command(system: str, s: argparse.Namespace, overrides: List[str], run_dir: Path, recipe_path: Path,
            out: Path) -> List[str]:
    if system == "launcher":
        return common.python_cmd(s.launcher_nproc, "-m", "launcher", "train", *overrides, *s.layout,
                                 f"run.dir={run_dir}")
    script, args = str(PEERS / SCRIPTS[system]), ["--recipe", str(recipe_path), "--out", str(out)]
    # `accelerate launch` starts several CPU processes only through mpirun; torchrun starts them as well.
    if system != "accelerate" or (s.device == "cpu" and s.nproc > 1):
        return common.python_cmd(s.nproc, script, *args)
    where = ["--cpu", "--num_cpu_threads_per_process", os.environ.get("OMP_NUM_THREADS", "1")] if s.device == "cpu" \
        else ["--multi_gpu"] * (s.nproc > 1)
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(s.nproc), "--num_machines", "1",
            "--mixed_precision", "bf16" if s.device == "cuda" else "no", "--dynamo_backend", "no", *where,
            "--main_process_port", str(free_port()), script, *args]


class Tail:
    """The rows appended to a JSON-lines file since the last call (none while it does not exist)."""

    def __init__(self, path: Optional[Path]):
        self.path, self.offset, self.partial = path, 0, ""

    def new_rows(self) -> List[dict]:
        if self.path is None or not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            data = f.read()
            self.offset = f.tell()
        *lines, self.partial = (self.partial + data).split("\n")
        return [json.loads(line) for line in lines if line.strip()]


def own_cpu(pid: int) -> Optional[float]:
    """utime + stime of one process (all its threads, none of its children), from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def execute(cmd: List[str], env: dict, timeout: float, follow: Optional[Path] = None) -> tuple:
    """(wall seconds from launch to exit, CPU seconds of the whole process tree, CPU marks). With `follow`
    (a launcher's metrics.jsonl), the launched process's own CPU time is sampled as each row appears:
    {step: CPU seconds}, late by the 10 ms poll at most."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_marks: Dict[int, float] = {}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=out, stderr=err, text=True)
        tail = Tail(follow)
        while proc.poll() is None:
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                raise subprocess.TimeoutExpired(cmd, timeout)
            rows = tail.new_rows()
            cpu = own_cpu(proc.pid) if rows else None
            for row in rows:
                cpu_marks.setdefault(row["step"], cpu)
            time.sleep(0.01 if follow is not None else 0.1)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = (stderr.strip() or stdout.strip()).splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"exit {proc.returncode}: {tail[0][:300]}\n{' '.join(cmd)}\n{stdout[-3000:]}\n"
                           f"{stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, cpu_marks


def measures(marks: List[list], global_batch: int, val_ms: List[float], ckpt_ms: Dict[int, float],
             results: List[dict], metric: str, goal: str) -> dict:
    """The same figures for every system, from its (step, time[, process CPU time]) marks, stalls and EMA
    results. `train_cpu_s`: the training process's CPU time from the first to the last mark (for one
    single-threaded process, what that span takes on an idle core, whatever the machine's load)."""
    rates = [(b[0] - a[0]) * global_batch / (b[1] - a[1]) for a, b in zip(marks, marks[1:]) if b[1] > a[1]]
    values = [row["metrics"][metric] for row in sorted(results, key=lambda row: row["step"])]
    cpu = [m[2] for m in marks if len(m) > 2 and m[2] is not None]
    return {"rate": statistics.median(rates) if rates else None,
            "train_cpu_s": cpu[-1] - cpu[0] if len(cpu) == len(marks) > 1 else None,
            "val_stall_ms": statistics.mean(val_ms) if val_ms else None,
            "ckpt_stall_ms": statistics.mean(ckpt_ms.values()) if ckpt_ms else None,
            "validations": len(values), "checkpoints": len(ckpt_ms), "final": values[-1] if values else None,
            "best": (max if goal == "max" else min)(values) if values else None}


def read_launcher(run_dir: Path, metric: str, goal: str, cpu_marks: Dict[int, float]) -> dict:
    """From the run directory: metrics.jsonl marks, checkpoint stalls (`blocked_ms` where the event has it,
    else the time from the step's hand-off event to its checkpoint event, which is the save), the stall per
    validation (the `handoff` event's blocked_ms plus its step's checkpoint stall: the hand-off sends that
    checkpoint's snapshot, which the training thread took once for both), the EMA results of
    val/results.jsonl, and the training time from the `start` to the `end` event."""
    events = jsonl(run_dir / "events.jsonl")
    kind = lambda name: [e for e in events if e["event"] == name]  # noqa: E731
    start, end, summary = kind("start")[0], kind("end")[0], json.loads((run_dir / "summary.json").read_text())
    handoff = {e["step"]: e for e in kind("handoff")}
    ckpt, estimated = {}, False
    for e in kind("checkpoint"):
        if e.get("blocked_ms") is not None:
            ckpt[e["step"]] = ckpt.get(e["step"], 0.0) + e["blocked_ms"]
        elif e["step"] in handoff:
            ckpt[e["step"]], estimated = (e["time"] - handoff[e["step"]]["time"]) * 1e3, True
    rows = [{"step": r["step"], "metrics": r["metrics"]} for r in jsonl(run_dir / "val" / "results.jsonl")
            if r.get("weights") == "ema" and not r.get("source")]
    marks = [[r["step"], r["time"], cpu_marks.get(r["step"])] for r in jsonl(run_dir / "metrics.jsonl")]
    shared = {} if estimated else ckpt  # an estimate holds the save itself, not a shared snapshot
    val_ms = [e["blocked_ms"] + shared.get(step, 0.0) for step, e in handoff.items()]
    out = measures(marks, start["global_batch"], val_ms, ckpt, rows, metric, goal)
    threads = (kind("threads") or [{}])[0]
    return {**out, "train_s": end["time"] - start["time"], "threads": threads.get("trainer"),
            "validator_threads": threads.get("validator"), "ckpt_estimated": estimated,
            "stale": len(summary.get("stale_steps", [])), "ema_tau": summary.get("ema_tau")}


def read_peer(out: Path, global_batch: int, metric: str, goal: str) -> dict:
    data = json.loads(out.read_text())
    ckpt: Dict[int, float] = {}
    for c in data["checkpoints"]:  # files written at the same step (Lightning's latest and best) add up
        ckpt[c["step"]] = ckpt.get(c["step"], 0.0) + c["seconds"] * 1e3
    res = measures(data["marks"], global_batch, [v["seconds"] * 1e3 for v in data["validations"]], ckpt,
                   data["results"], metric, goal)
    return {**res, "train_s": data["train_s"], "threads": data["threads"]}


def missing(system: str) -> Optional[str]:
    """Why a peer cannot run here, or None."""
    if system == "launcher":
        return None
    absent = []
    for name in NEEDS[system]:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(name)
    return f"not installed ({', '.join(absent)}): pip install -e '.[peers]'" if absent else None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "lightning", "accelerate", "timm"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def best(runs: List[dict]) -> dict:
    """The least disturbed figure of each kind over the repeats (other load only slows a run down);
    the metrics and counts of the fastest run."""
    fastest = min(runs, key=lambda r: r["wall_s"])
    pick = lambda key, f: f([r[key] for r in runs if r[key] is not None], default=None)  # noqa: E731
    return {**fastest, **{k: pick(k, min) for k in ("wall_s", "cpu_s", "train_s", "train_cpu_s", "val_stall_ms",
                                                      "ckpt_stall_ms")},
            "rate": pick("rate", max), "repeats": len(runs)}


def ratio(ours: Optional[float], theirs: Optional[float], higher_is_better: bool) -> Optional[float]:
    if ours is None or theirs is None or (theirs if higher_is_better else ours) == 0:
        return None
    return ours / theirs if higher_is_better else theirs / ours


FIGURES = [  # (key, label, unit, higher is better, format)
    ("wall_s", "wall time to the end", "s", False, "{:.1f} s"),
    ("train_s", "training time", "s", False, "{:.1f} s"),
    ("train_cpu_s", "training-process CPU", "s", False, "{:.1f} s"),
    ("rate", "throughput between validations", "samples/s", True, "{:.0f}/s"),
    ("val_stall_ms", "stall per validation", "ms", False, "{:.1f} ms"),
    ("ckpt_stall_ms", "stall per checkpoint", "ms", False, "{:.1f} ms"),
    ("final", "final EMA", "metric", True, "{:.4f}"),
    ("best", "best EMA", "metric", True, "{:.4f}"),
    ("cpu_s", "CPU time", "s", False, "{:.1f} s"),
]


def better_high(key: str, higher: bool, goal: str) -> bool:
    return goal == "max" if key in ("final", "best") else higher


def rows_for(task: str, res: Dict[str, dict], metric: str, goal: str) -> List[dict]:
    ours, rows = res["launcher"], []
    for system, theirs in res.items():
        if system == "launcher":
            continue
        for key, label, unit, higher, _ in FIGURES:
            if key in ("train_s", "cpu_s"):
                continue  # in the tables; the rows keep what the issue asks for
            unit = metric if unit == "metric" else unit
            r = ratio(ours[key], theirs[key], better_high(key, higher, goal))
            rows.append(common.row(f"{task}: {label}, launcher vs {LABELS[system]}", _round(ours[key]),
                                   _round(theirs[key]), LABELS[system], unit, ratio=None if r is None else round(r, 4)))
    return rows


def _round(v):
    return None if v is None else round(v, 4)


def table(task: str, res: Dict[str, dict], metric: str, goal: str) -> str:
    """One markdown table: each peer's figure with its ratio against the launcher of the same run."""
    heads = [label.replace("EMA", f"EMA {metric}") for _, label, *_ in FIGURES]
    lines = [f"| {task} | " + " | ".join(heads) + " | validations | threads (train) |",
             "|---" * (len(FIGURES) + 3) + "|"]
    ours = res["launcher"]
    for system, r in res.items():
        cells = []
        for key, _, _, higher, form in FIGURES:
            cell = "-" if r[key] is None else form.format(r[key])
            if key == "ckpt_stall_ms" and r.get("ckpt_estimated") and r[key] is not None:
                cell = "~" + cell
            if system != "launcher" and r[key] is not None:
                q = ratio(ours[key], r[key], better_high(key, higher, goal))
                cell += f" ({q:.2f})" if q is not None else ""
            cells.append(cell)
        extra = f"{r['validations']}" + (f" ({r['stale']} stale skipped)" if r.get("stale") else "")
        threads = f"{r['threads']}" + (f" + validator {r['validator_threads']}" if r.get("validator_threads") else "")
        lines.append(f"| {LABELS[system]} | " + " | ".join(cells) + f" | {extra} | {threads} |")
    return "\n".join(lines) + "\n"


def launcher_layout(s: argparse.Namespace, batch: int) -> tuple:
    """(extra overrides, processes) of the launcher on `s.nproc` GPUs, at the peers' global batch:
    - one GPU: one training process, its validator process beside it on the same GPU (the default);
    - `rank`: the default validator rank on a GPU of its own, N - 1 training ranks with the micro-batch
      raised to N/(N-1) of the peers' (only where that divides: 2 or 3 GPUs at batch 64);
    - `share`: N + 1 processes, N training ranks and the validator rank sharing the last GPU;
    - `process`: N training ranks, the validator a process sharing the first GPU;
    - `auto`: rank where it divides, else share."""
    n, layout = s.nproc, s.launcher_layout
    if n == 1:
        return [], 1
    divides = (batch * n) % (n - 1) == 0
    if layout == "rank" and not divides:
        raise SystemExit(f"peers: --launcher-layout rank: a global batch of {batch * n} does not split over {n - 1} "
                         "training ranks; use --launcher-layout share or process")
    if layout == "rank" or (layout == "auto" and divides):
        return [f"batch.size={batch * n // (n - 1)}", f"batch.global_size={batch * n}"], n
    if layout == "process":
        return ["validation.mode=process"], n
    return ["validation.share_gpu=true"], n + 1


def run_once(system: str, task: str, rec: dict, overrides: List[str], s: argparse.Namespace, env: dict,
             work: Path) -> dict:
    """One run of one system, timed from outside; its figures."""
    work.mkdir()
    recipe_path, out = work / "recipe.json", work / "measures.json"
    recipe_path.write_text(json.dumps({**rec, "run_dir": str(work)}))
    follow = work / "run" / "metrics.jsonl" if system == "launcher" and s.launcher_nproc == 1 else None
    wall, cpu, cpu_marks = execute(command(system, s, overrides, work / "run", recipe_path, out), env, s.timeout,
                                   follow)
    m = read_launcher(work / "run", rec["metric"], rec["goal"], cpu_marks) if system == "launcher" else \
        read_peer(out, rec["batch"] * s.nproc, rec["metric"], rec["goal"])
    return {**m, "wall_s": wall, "cpu_s": cpu}


def run_task(task: str, systems: List[str], s: argparse.Namespace, env: dict, tmp: Path, notes: List[str],
             load: List[float]) -> tuple:
    """Every system, `s.repeat` interleaved rounds: (the best figures per system, the raw runs)."""
    overrides = [*TASKS[task][s.size], *FIXED]
    rec = make_recipe(launcher_config(overrides, env), s.device, s.nproc)
    s.layout, s.launcher_nproc = launcher_layout(s, rec["batch"])
    runs: Dict[str, List[dict]] = {n: [] for n in systems}
    for i in range(s.repeat):
        for system in list(runs):
            try:
                m = run_once(system, task, rec, overrides, s, env, tmp / f"{task}-{system}-{i}")
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"peers: {task} {system} failed: {e}", file=sys.stderr, flush=True)
                if system == "launcher":
                    raise
                notes.append(f"{task}: {LABELS[system]} failed, skipped: {str(e).splitlines()[0]}")
                del runs[system]
                continue
            runs[system].append(m)
            load.append(os.getloadavg()[0])
            print(f"peers: {task} round {i + 1}/{s.repeat} {system:10s} wall {m['wall_s']:6.1f} s, train "
                  f"{m['train_s']:6.1f} s, {m['rate'] or 0:7.0f} samples/s, final {rec['metric']} {m['final']}, "
                  f"best {m['best']}", flush=True)
    results = {n: best(r) for n, r in runs.items()}
    for system, mine in runs.items():  # how much the machine moved the comparison from round to round
        if system != "launcher" and len(mine) > 1:
            per_round = [m["wall_s"] / ours["wall_s"] for m, ours in zip(mine, runs["launcher"])]
            notes.append(f"{task}: {LABELS[system]} / launcher wall time per round: "
                         + ", ".join(f"{q:.2f}" for q in per_round))
    tau = results["launcher"].get("ema_tau")
    if tau is not None and abs(tau - rec["ema_tau"]) > 1e-6 * tau:
        notes.append(f"{task}: the launcher's ema_tau {tau:.1f} differs from the peers' {rec['ema_tau']:.1f}")
    return results, {"recipe": rec, "launcher_overrides": overrides + s.layout, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI sizes, one round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs) for every system")
    ap.add_argument("--launcher-layout", default="auto", choices=["auto", "rank", "share", "process"],
                    help="with --nproc >= 2, where the launcher's validator runs (see launcher_layout)")
    ap.add_argument("--repeat", type=int, default=0, help="interleaved rounds, the best kept (default 1 quick, 3 full)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--systems", default=",".join(LABELS))
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    s = ap.parse_args()
    s.size = "quick" if s.quick else "gpu" if s.device == "cuda" else "cpu"
    s.repeat = s.repeat or (1 if s.quick else 3)
    systems = [n for n in LABELS if n in s.systems.split(",")]  # the launcher first: every ratio is against it
    if "launcher" not in systems:
        raise SystemExit("peers: --systems must include launcher (every figure is a ratio against it)")
    skipped = {n: why for n in systems if (why := missing(n))}
    notes = [f"{LABELS[n]}: skipped, {why}" for n, why in skipped.items()]
    env, load, results, raw = child_env(s.device), [os.getloadavg()[0]], {}, {}
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        for task in [t for t in s.tasks.split(",") if t]:
            results[task], raw[task] = run_task(task, [n for n in systems if n not in skipped], s, env, Path(tmp),
                                                notes, load)
    v = versions()
    goals = {task: (raw[task]["recipe"]["metric"], raw[task]["recipe"]["goal"]) for task in results}
    tables = "\n".join(f"#### {task}\n\n{table(task, res, *goals[task])}" for task, res in results.items())
    notes += [f"versions: {', '.join(f'{k} {x}' for k, x in v.items() if x)}",
              f"{s.nproc} process(es) per system on {s.device}; " + (
                  "OMP_NUM_THREADS=1 for every training process; the launcher's validator process takes the second "
                  "core, the peers validate inline" if s.device == "cpu" else
                  f"launcher: {s.launcher_nproc} process(es), {' '.join(s.layout) or 'its validator process beside'}"),
              f"best of {s.repeat} interleaved round(s); load average {min(load):.1f}-{max(load):.1f} during the runs",
              "ratio > 1: the launcher is better (peer time / launcher time, launcher rate or metric / peer's)"]
    rows = [r for task, res in results.items() for r in rows_for(task, res, *goals[task])]
    print(tables)
    common.OUT.mkdir(parents=True, exist_ok=True)
    (common.OUT / "peers.md").write_text(tables)
    device = torch.device("cuda") if s.device == "cuda" else torch.device("cpu")
    print("wrote", common.write("peers", device, rows, quick=s.quick, notes=notes, versions=v, results=results,
                                runs=raw, nproc=s.nproc))


if __name__ == "__main__":
    main()
