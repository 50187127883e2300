"""Shared helpers. Tests of the launcher's behaviour run the real launcher in real processes; tests of
one module (the EMA's math, file formats, the import graph, ...) run it in this one.

`launch()` starts `python -m launcher ...` (or `torchrun ... -m launcher ...`)
with the repository on PYTHONPATH, so the tests exercise this checkout whether or
not it is pip-installed, and with a shared data cache so MNIST-1D is generated once.

Under pytest-xdist (`-n 2`, README's test command) the workers share the session
fixtures' runs (`_once`: computed by the first worker that needs them) and a test
marked `serial` (one that measures time, or needs every core) runs while no other
test does (`_turn`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Small and fast: the MLP on MNIST-1D, a few epochs, no wandb, plain progress.
FAST = ["job.model=mlp", "train.epochs=2", "logger.wandb.mode=disabled", "logger.progress=plain",
        "logger.telemetry.every_s=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("XDG_CACHE_HOME", str(ROOT / ".cache"))
    env["WANDB_MODE"] = env.get("WANDB_MODE", "offline")
    env["WANDB_SILENT"] = "true"
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
              "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def interruptible() -> None:
    """preexec_fn for a child that must see Ctrl-C as a person's would: a test run started from a
    background job inherits SIGINT ignored, and Python then never installs its KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def command(args: List[str], nproc: int = 0, torchrun_args: Optional[List[str]] = None) -> List[str]:
    """nproc=0: plain `python -m launcher`; nproc>=1: torchrun with that many workers."""
    if nproc == 0:
        return [sys.executable, "-m", "launcher", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", *(torchrun_args or []), "-m", "launcher", *args]


def launch(args: List[str], nproc: int = 0, cwd: Optional[Path] = None, env: Optional[dict] = None,
           timeout: float = 300, check: bool = True, torchrun_args: Optional[List[str]] = None
           ) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(args, nproc, torchrun_args), cwd=cwd or ROOT, env=child_env(env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    """Poll `ready()` until it holds; fail with the output if `proc` exits first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {what} within {timeout}s")


def children(pid: int) -> list:
    """Processes whose parent is pid (the workers of a torchrun agent)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def read_jsonl(path: Path) -> list:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def final_weights(run_dir: Path) -> dict:
    """Model weights of the newest checkpoint in a run directory."""
    import torch

    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-*.pt"))
    return torch.load(ckpts[-1], weights_only=True)


def assert_same_final_weights(a: Path, b: Path) -> None:
    """The newest checkpoints of two runs hold bit-identical model and EMA weights at the same step."""
    import torch

    wa, wb = final_weights(a), final_weights(b)
    assert wa["step"] == wb["step"]
    for part in ("model", "ema"):
        sa, sb = (wa[part] or {}), (wb[part] or {})
        sa, sb = sa.get("shadow", sa), sb.get("shadow", sb)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k} differs"


def _shared_root(tmp_path_factory) -> Path:
    """The session's temporary directory, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(tmp_path_factory, name: str, make):
    """`make(directory)` run once per test session, whichever xdist worker asks first; the others wait
    for it and get the same (pickled) result."""
    root = _shared_root(tmp_path_factory)
    directory, done = root / name, root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            directory.mkdir(parents=True, exist_ok=True)
            done.write_bytes(pickle.dumps(make(directory)))
        return pickle.loads(done.read_bytes())


@contextlib.contextmanager
def _turn(root: Path, alone: bool):
    """A fair readers-writer lock over the xdist workers: every test holds the cpu lock shared, a
    `serial` one exclusively. The turnstile keeps a waiting serial test from being starved."""
    with open(root / "turnstile.lock", "w") as gate, open(root / "cpu.lock", "w") as cpu:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(cpu, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        yield


@pytest.fixture(autouse=True)
def _serial(request, tmp_path_factory):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    with _turn(_shared_root(tmp_path_factory), alone=request.node.get_closest_marker("serial") is not None):
        yield


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict:
    """Uninterrupted FAST runs to compare resumed runs with: 1: one process; 2: two processes with the
    default validation (one trainer + the validator rank); "ddp": two training ranks (validation inline)."""
    def make(root: Path) -> dict:
        launch(["train", *FAST, f"run.dir={root / 'one'}"])
        two = launch(["train", *FAST, f"run.dir={root / 'two'}"], nproc=2)
        (root / "two.stdout").write_text(two.stdout)  # what the console showed (tests/telemetry/test_console.py)
        launch(["train", *FAST, "validation.mode=inline", f"run.dir={root / 'ddp'}"], nproc=2)
        return {1: root / "one", 2: root / "two", "ddp": root / "ddp"}
    return _once(tmp_path_factory, "reference", make)


def files_of(run: Path) -> dict:
    """Every file of a directory: path -> (size, mtime_ns), to tell that a launch changed nothing."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="session")
def relaunched(tmp_path_factory) -> dict:
    """One run over three launches: 20 steps; resumed to 40 (train.max_steps raised); the same command again,
    with nothing left to do. Each launch's process, and the run's files before and after the third."""
    def make(root: Path) -> dict:
        run = root / "run"
        args = ["train", *FAST, "validation.every_steps=10", "validation.policy=all", f"run.dir={run}"]
        first = launch([*args, "train.max_steps=20"])
        first_summary = (run / "summary.json").read_bytes()
        second = launch([*args, "train.max_steps=40"])
        before = files_of(run)
        third = launch([*args, "train.max_steps=40"])
        return {"run": run, "procs": [first, second, third], "first_summary": first_summary, "before": before,
                "after": files_of(run)}
    return _once(tmp_path_factory, "relaunched", make)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
