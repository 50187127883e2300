"""Sweeps, Hydra's way: `launcher train -m optim.lr=0.01,0.1 [...]` trains every point of the grid.

- The points are Hydra's basic sweeper's, in its order: comma lists, `range()`, `choice()`, `glob()`
  for groups (`job=mnist1d,synthetic`), the cartesian product of every swept key.
- Every point is a whole `launcher train` process with its own run directory `<sweep dir>/<n>`; the
  sweep directory is `run.dir` if given, else `<run.root>/<run.id or the Slurm/torchrun id or
  sweep-<time>>`. `sweep-plan.json` lists each point's overrides, `status/<n>.json` its exit status,
  and `sweep.json` / `sweep.md` sum it up (status, steps, best metric; the best point).
- `hydra/launcher=basic` (the default): the points run one after another here. Under torchrun every
  rank runs the same points in the same order, each point's ranks forming a fresh group (a distinct
  TORCHELASTIC_RUN_ID per point keys its store). The exit status is 1 if any point failed.
- `hydra/launcher=slurm`: one Slurm array task per point (slurm/sweep.sbatch, torchrun inside);
  `hydra.launcher.<option>=<value>` becomes `sbatch --<option>=<value>` (partition, time,
  gpus_per_node, ...; `array_parallelism` caps how many points run at once).
- A relaunch of the same sweep (same directory, same points) resumes each point (`run.resume=auto`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from launcher.config.compose import split_config_dir
from launcher.files import atomic_write, read_json, write_json
from launcher.rundir import SweepDir
from launcher.errors import ConfigError

SWEEP_FLAGS = ("-m", "--multirun")
LAUNCHERS = ("basic", "slurm")
RESERVED = ("run.dir", "run.root", "run.id")  # a point's run directory is <sweep dir>/<n>
SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "sweep.sbatch"


def is_multirun(args: List[str]) -> bool:
    return any(a in SWEEP_FLAGS for a in args)


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def split(args: List[str]) -> Tuple[str, List[str], List[str], List[str]]:
    """(launcher, the --config-dir arguments, sbatch options from hydra.launcher.*, the overrides)."""
    config_dir, args = split_config_dir([a for a in args if a not in SWEEP_FLAGS])
    launcher, sbatch, rest = "basic", [], []
    for a in args:
        key, _, value = a.partition("=")
        if key == "hydra/launcher":
            if value not in LAUNCHERS:
                raise ConfigError(f"hydra/launcher={value} is not a launcher here; use hydra/launcher=basic "
                                  "(points one after another) or hydra/launcher=slurm (one Slurm job per point)")
            launcher = value
        elif key.startswith("hydra.launcher."):
            sbatch.append((key[len("hydra.launcher."):], value))
        else:
            rest.append(a)
    if sbatch and launcher != "slurm":
        raise ConfigError(f"hydra.launcher.{sbatch[0][0]}: sbatch options need hydra/launcher=slurm")
    options = [f"--array=0-{{last}}%{v}" if k == "array_parallelism" else f"--{k.replace('_', '-')}={v}"
               for k, v in sbatch]
    return launcher, (["--config-dir", str(config_dir)] if config_dir else []), options, rest


def expand(overrides: List[str]) -> Tuple[List[List[str]], List[str]]:
    """(each point's overrides, the swept keys), as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # Hydra's parser errors span lines; the first names the override
        raise ConfigError(f"--multirun: {str(e).strip().splitlines()[0]}") from None
    swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
    for key in swept:
        if key in RESERVED:
            raise ConfigError(f"{key} cannot be swept: each point runs in <sweep dir>/<n>; set run.dir=<dir> "
                              "for the sweep directory")
    [points] = BasicSweeper.split_arguments(parsed, None)
    return points, swept


def sweep_root(cfg: Any) -> Path:
    """run.dir, else <run.root>/<run.id, SLURM_JOB_ID, TORCHELASTIC_RUN_ID..., else sweep-<time>>."""
    from launcher.distributed.env import run_id, run_id_from_env

    if cfg.run.dir:
        return Path(cfg.run.dir).resolve()
    if not (cfg.run.id or run_id_from_env()) and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ConfigError("a sweep under torchrun needs a directory every rank agrees on: set run.dir=<dir>")
    return (Path(cfg.run.root) / run_id(cfg.run.id, prefix="sweep-")).resolve()


def multirun(args: List[str], check: Callable[[List[str], bool], Any]) -> int:
    """`launcher train -m ...`: check every point (exit 2 on bad input before anything runs), then run them.
    `check(overrides, here)` composes and checks one point's config (`here`: for this machine)."""
    launcher, config_args, sbatch, overrides = split(args)
    points, swept = expand(overrides)
    cfgs = [check([*config_args, *p], launcher == "basic") for p in points]
    sweep = SweepDir(sweep_root(cfgs[0]))
    plan = {"config_args": config_args, "swept": swept, "command": "launcher train " + " ".join(args),
            "points": [{"n": n, "overrides": [o for o in p if _key(o) != "run.dir"],
                        "params": [o for o in p if _key(o) in swept]} for n, p in enumerate(points)]}
    if sweep.plan.exists() and read_json(sweep.plan)["points"] != plan["points"]:
        raise ConfigError(f"{sweep} holds another sweep (other points); choose a new run.dir for this one")
    if launcher == "slurm":
        return submit(sweep, plan, sbatch)
    return run_local(sweep, plan)


def point_args(sweep: SweepDir, plan: dict, n: int) -> List[str]:
    """The `launcher train` arguments of point `n` of `plan`."""
    if not 0 <= n < len(plan["points"]):
        raise ConfigError(f"{sweep} has points 0..{len(plan['points']) - 1}, not {n}")
    return [*plan["config_args"], *plan["points"][n]["overrides"], f"run.dir={sweep.point(n).root}"]


def from_plan(args: List[str]) -> List[str]:
    """`train --sweep-point <sweep dir> <n>` (slurm/sweep.sbatch) -> that point's arguments."""
    if not args or args[0] != "--sweep-point":
        return args
    if len(args) != 3 or not args[2].isdigit():
        raise ConfigError("usage: launcher train --sweep-point <sweep dir> <n>")
    sweep = SweepDir(Path(args[1]).resolve())
    if not sweep.plan.exists():
        raise ConfigError(f"{sweep} holds no sweep-plan.json; point --sweep-point at a sweep directory")
    return point_args(sweep, read_json(sweep.plan), int(args[2]))


def run_local(sweep: SweepDir, plan: dict) -> int:
    """Every point, one after another, in a child process; signals stop the running point and the sweep."""
    main = int(os.environ.get("RANK", 0)) == 0
    if main:
        sweep.root.mkdir(parents=True, exist_ok=True)
        write_json(sweep.plan, plan)
    stopped: List[int] = []
    child: List[Optional[subprocess.Popen]] = [None]

    def forward(signum: int, _frame: Any) -> None:
        stopped.append(signum)
        if child[0] is not None and child[0].poll() is None:
            child[0].send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    failed, status, total = 0, 0, len(plan["points"])
    try:
        for n in range(total):
            if stopped:
                break
            if main:
                params = " ".join(plan["points"][n]["params"]) or "(no swept keys)"
                print(f"launcher: sweep point {n + 1}/{total}: {params} -> {sweep.point(n).root}", file=sys.stderr,
                      flush=True)
            env = dict(os.environ)
            if "TORCHELASTIC_RUN_ID" in env:  # each point's ranks find their own store (distributed/groups.py)
                env["TORCHELASTIC_RUN_ID"] = f"{env['TORCHELASTIC_RUN_ID']}-sweep{n}"
            args = [sys.executable, "-m", "launcher", "train", *point_args(sweep, plan, n)]
            child[0] = subprocess.Popen(args, env=env)
            rc = child[0].wait()
            failed += rc != 0
            status = rc if stopped else status
            if main:
                record(sweep, n, rc)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if main:
        print(summarize(sweep), file=sys.stderr)
    if stopped:
        return status or 128 + stopped[0]
    return int(failed > 0)


def submit(sweep: SweepDir, plan: dict, options: List[str]) -> int:
    """One Slurm array task per point: sbatch --array=0-<N-1> slurm/sweep.sbatch <sweep dir>."""
    if shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm needs Slurm's sbatch on PATH; run the sweep here with "
                          "hydra/launcher=basic (the default)")
    if not SCRIPT.exists():
        raise ConfigError(f"{SCRIPT} is missing: submit Slurm sweeps from a checkout of the repository")
    last = len(plan["points"]) - 1
    options = [o.replace("{last}", str(last)) for o in options]
    array = [] if any(o.startswith("--array=") for o in options) else [f"--array=0-{last}"]
    sweep.root.mkdir(parents=True, exist_ok=True)
    write_json(sweep.plan, plan)
    env = {**os.environ, "LAUNCHER_DIR": os.environ.get("LAUNCHER_DIR", str(SCRIPT.parent.parent)),
           "LAUNCHER_PYTHON": os.environ.get("LAUNCHER_PYTHON", sys.executable)}
    out = subprocess.run(["sbatch", "--parsable", *array, *options, f"--output={sweep.root}/slurm-%A_%a.out",
                          str(SCRIPT), str(sweep.root)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"sbatch refused the sweep: {' '.join(out.stderr.split())}")
    job = out.stdout.strip().split(";")[0]
    summarize(sweep, job=job)
    print(f"launcher: submitted {last + 1} point(s) as Slurm array job {job}; runs in {sweep}/<n>, "
          f"summary: python -m launcher sweep {sweep}")
    return 0


@contextlib.contextmanager
def _locked(sweep: SweepDir) -> Iterator[None]:
    """Array tasks finishing together take turns rewriting the summary."""
    with open(sweep.lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def record(sweep: SweepDir, n: int, returncode: int) -> None:
    sweep.status(n).parent.mkdir(parents=True, exist_ok=True)
    write_json(sweep.status(n), {"returncode": returncode, "time": time.time()})
    summarize(sweep)


def _status(returncode: Optional[int], finished: bool) -> str:
    if returncode is None:
        return "pending"
    if returncode == 0:
        return "completed" if finished else "requeued"
    return "interrupted" if returncode in (130, 138, 143) else "failed"


def _goal(config: Path) -> str:
    from omegaconf import OmegaConf

    try:
        return str(OmegaConf.load(config).validation.goal)
    except Exception:  # a point that never started has no config.yaml
        return "max"


def summarize(sweep: SweepDir, job: Optional[str] = None) -> str:
    """Rewrite sweep.json and sweep.md from the plan, the statuses and each point's summary.json; the table."""
    with _locked(sweep):
        plan = read_json(sweep.plan)
        old = read_json(sweep.summary_json) if sweep.summary_json.exists() else {}
        rows: List[Dict[str, Any]] = []
        for point in plan["points"]:
            n, run = point["n"], sweep.point(point["n"])
            rc = read_json(sweep.status(n))["returncode"] if sweep.status(n).exists() else None
            summary = run.read_summary() or {}
            rows.append({"n": n, "params": point["params"], "overrides": point["overrides"], "run_dir": str(run),
                         "status": _status(rc, bool(summary)), "returncode": rc, **{
                             k: summary.get(k) for k in ("steps", "best_metric", "best_value", "best_step",
                                                         "stopped_early", "wall_time_s")}})
        scored = [r for r in rows if r["status"] == "completed" and r["best_value"] is not None]
        best = None
        if scored:
            sign = -1 if _goal(sweep.point(scored[0]["n"]).config) == "min" else 1
            best = max(scored, key=lambda r: sign * r["best_value"])
        data = {"sweep_dir": str(sweep), "command": plan["command"], "swept": plan["swept"],
                "slurm_job": job or old.get("slurm_job"), "points": rows,
                "failed": sum(r["status"] in ("failed", "interrupted") for r in rows),
                "best": {k: best[k] for k in ("n", "params", "best_metric", "best_value", "best_step")}
                if best else None}
        write_json(sweep.summary_json, data)
        table = _markdown(data)
        atomic_write(sweep.summary_md, lambda f: f.write(table), mode="w")
    return table


def _markdown(data: dict) -> str:
    def cell(v: Any, fmt: str = ".4f") -> str:
        return "" if v is None else format(v, fmt) if isinstance(v, float) else str(v)

    lines = [f"# sweep {data['sweep_dir']}", "", f"`{data['command']}`", "",
             "| n | " + " | ".join(["params", "status", "steps", "best", "best step", "wall s"]) + " |",
             "|---" * 7 + "|"]
    for r in data["points"]:
        best = f"{r['best_metric']} {cell(r['best_value'])}" if r["best_metric"] else ""
        lines.append(f"| {r['n']} | {' '.join(r['params'])} | {r['status']} | {cell(r['steps'])} | {best} | "
                     f"{cell(r['best_step'])} | {cell(r['wall_time_s'], '.1f')} |")
    b = data["best"]
    lines += ["", f"best: point {b['n']} ({' '.join(b['params'])}): {b['best_metric']} {cell(b['best_value'])} "
              f"at step {b['best_step']}" if b else "best: none yet",
              f"failed: {data['failed']} of {len(data['points'])}"]
    return "\n".join(lines) + "\n"


def command(args: List[str]) -> int:
    """`launcher sweep <dir>`: rewrite and print a sweep's summary; `--record <n> <status>` first records a
    point's exit status (slurm/sweep.sbatch does, as each array task ends). Exit 1 if a point failed."""
    if not args or args[0].startswith("-"):
        raise ConfigError("usage: launcher sweep <sweep dir> [--record <n> <exit status>]")
    sweep = SweepDir(Path(args[0]).resolve())
    if not sweep.plan.exists():
        raise ConfigError(f"{sweep} holds no sweep-plan.json; point it at a sweep directory")
    if args[1:2] == ["--record"]:
        if len(args) != 4 or not args[2].isdigit() or not args[3].lstrip("-").isdigit():
            raise ConfigError("usage: launcher sweep <sweep dir> --record <n> <exit status>")
        record(sweep, int(args[2]), int(args[3]))
        return 0
    print(summarize(sweep))
    return int(read_json(sweep.summary_json)["failed"] > 0)
