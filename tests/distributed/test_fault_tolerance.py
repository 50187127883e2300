"""Fault tolerance with real processes: signals, torchrun restarts, two agents, a full disk.

Every interrupted run is resumed and its final weights are compared with an
uninterrupted run of the same config (CPU, deterministic: bit-identical).
`debug.step_delay_s` only sleeps between steps, so it leaves the numbers alone
while keeping a short run alive long enough to be signalled or killed mid-run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, FAST, assert_same_final_weights, child_env, children, command, free_port, launch, \
    read_jsonl, wait_until

SLOW = ["debug.step_delay_s=0.04"]


def losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]


def events(run: Path, kind: str) -> list:
    return [e for e in read_jsonl(run / "events.jsonl") if e["event"] == kind]


def start(args, nproc=0, torchrun_args=None, log=None) -> subprocess.Popen:
    """Start in the background; output to a pipe, or to the file `log` (read it when a test fails)."""
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(command(args, nproc, torchrun_args), env=child_env(), stdout=out,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> None:
    wait_until(proc, lambda: any(r["step"] >= step for r in read_jsonl(run / "metrics.jsonl")), f"step {step}", timeout)


@pytest.mark.slow
def test_sigterm_to_torchrun_agent_stops_all_ranks_then_relaunch_is_exact(reference, run_dir):
    proc = start(["train", *FAST, *SLOW, f"run.dir={run_dir}"], nproc=2)
    wait_for_step(proc, run_dir, 30)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)  # the agent forwards it to both workers
    out, _ = proc.communicate(timeout=120)
    seconds = time.perf_counter() - t0
    assert proc.returncode != 0, out  # torchrun reports the run as interrupted
    [pre] = events(run_dir, "preempt")
    assert pre["signal"] == "SIGTERM" and pre["exit_code"] == 143
    ckpts = [e["step"] for e in events(run_dir, "checkpoint")]
    assert ckpts == [pre["step"]], "one checkpoint, at the step both ranks stopped at"
    assert not (run_dir / "summary.json").exists()
    print(f"SIGTERM to torchrun agent -> exit: {seconds:.2f}s; in-process signal->checkpointed "
          f"{pre['seconds_since_signal']}s; stopped at step {pre['step']}")

    launch(["train", *FAST, f"run.dir={run_dir}"], nproc=2)
    [res] = events(run_dir, "resume")
    assert res["step"] == pre["step"]  # no step lost
    assert losses(run_dir) == losses(reference[2])
    assert_same_final_weights(run_dir, reference[2])


@pytest.mark.slow
def test_sigusr1_single_process_exit_status_and_exact_resume(reference, run_dir):
    proc = start(["train", *FAST, *SLOW, f"run.dir={run_dir}"])
    wait_for_step(proc, run_dir, 20)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    print(f"SIGUSR1 -> exit {proc.returncode} in {time.perf_counter() - t0:.2f}s")
    assert proc.returncode == 128 + signal.SIGUSR1, out
    assert "stopped by SIGUSR1" in out
    [pre] = events(run_dir, "preempt")
    launch(["train", *FAST, f"run.dir={run_dir}", "run.resume=must"])
    assert events(run_dir, "resume")[0]["step"] == pre["step"]
    assert losses(run_dir) == losses(reference[1])
    assert_same_final_weights(run_dir, reference[1])


@pytest.mark.slow
def test_stop_signals_is_configurable(run_dir):
    # A signal not in the list keeps its default action (SIGUSR1: terminate, no checkpoint).
    proc = start(["train", *FAST, *SLOW, f"run.dir={run_dir}", "run.stop_signals=[SIGUSR2]"])
    wait_for_step(proc, run_dir, 10)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGUSR1 and not events(run_dir, "preempt")
    bad = launch(["train", *FAST, "run.stop_signals=[SIGKILL]"], check=False)
    assert bad.returncode == 2 and "run.stop_signals: SIGKILL cannot be caught" in bad.stderr


@pytest.mark.slow
def test_max_restarts_resumes_into_the_same_run_dir(reference, tmp_path):
    """Plain torchrun (rendezvous id "none"): the restarted group must find the same run directory."""
    root = tmp_path / "runs"
    launch(["train", *FAST, f"run.root={root}", "debug.fail_at_step=50", "checkpoint.every_steps=20"], nproc=2, torchrun_args=["--max-restarts=1"])
    [run] = list(root.iterdir())  # one run, not one per attempt
    assert [e["step"] for e in events(run, "debug_fail")] == [50]
    [restart] = events(run, "restart")
    assert restart["restart_count"] == 1
    assert events(run, "resume")[0]["restart_count"] == 1
    assert losses(run) == losses(reference[2])
    assert_same_final_weights(run, reference[2])


@pytest.mark.slow
def test_two_agents_kill_one_worker_restarts_both_and_resumes(reference, run_dir):
    """--nnodes=2 on one machine: two torchrun agents, c10d rendezvous on 127.0.0.1, one local rank each."""
    port = free_port()
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-agents",
            "--max-restarts=1", "--monitor-interval=0.5"]
    # Two training ranks (inline validation), so the killed worker is a trainer of the second "node".
    args = ["train", *FAST, *SLOW, "validation.mode=inline", f"run.dir={run_dir}", "checkpoint.every_steps=20"]
    logs = [run_dir.parent / f"agent-{i}.log" for i in range(2)]
    agents = [start(args, nproc=1, torchrun_args=rdzv, log=log) for log in logs]
    try:
        wait_for_step(agents[0], run_dir, 30)
        [worker] = children(agents[1].pid)
        os.kill(worker, signal.SIGKILL)  # kill -9 one worker of the second agent
        codes = [a.wait(timeout=240) for a in agents]
    finally:
        for a in agents:
            for pid in children(a.pid) if a.poll() is None else []:
                os.kill(pid, signal.SIGKILL)
            a.kill()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    [start0, start1] = events(run_dir, "start")
    assert start0["world"] == start1["world"] == 2
    [restart] = events(run_dir, "restart")
    assert restart["restart_count"] == 1
    [res] = events(run_dir, "resume")
    assert res["step"] == restart["step"] and res["step"] % 20 == 0 and res["step"] >= 20
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank-0.log", "rank-1.log"]
    assert losses(run_dir) == losses(reference["ddp"])
    assert_same_final_weights(run_dir, reference["ddp"])


def _small_fs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root/CAP_SYS_ADMIN): {r.stderr.decode().strip()}")


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_stops_every_rank(run_dir):
    ckpts = run_dir / "checkpoints"
    _small_fs(ckpts, "400k")  # room for one checkpoint (~270 KB), not for the next beside it
    try:
        out = launch(["train", *FAST, f"run.dir={run_dir}", "checkpoint.every_steps=40", "checkpoint.keep_last=1"],
                     nproc=2, check=False, timeout=180)
        assert out.returncode != 0
        assert "could not save checkpoint" in out.stderr and "No space left on device" in out.stderr
        assert "the previous checkpoint step-00000040.pt is intact" in out.stderr
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000040.json", "step-00000040.pt"]
        assert torch.load(ckpts / "step-00000040.pt", weights_only=True)["step"] == 40
        assert not (run_dir / "summary.json").exists()
    finally:
        subprocess.run(["umount", str(ckpts)], check=False)


def test_unwritable_checkpoint_dir_is_a_clear_error(run_dir):
    if shutil.which("chattr") is None:
        pytest.skip("chattr is missing; root ignores chmod, so there is no way to make a directory unwritable")
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(ckpts)], capture_output=True).returncode != 0:
        pytest.skip("this file system does not support chattr +i")
    try:
        out = launch(["train", *FAST, f"run.dir={run_dir}", "train.max_steps=5"], check=False)
        assert out.returncode == 1, out.stderr
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("launcher: error:")]
        assert len(lines) == 1 and "Operation not permitted" in lines[0] and "no earlier checkpoint" in lines[0]
        assert "Traceback" not in out.stderr
    finally:
        subprocess.run(["chattr", "-i", str(ckpts)], check=False)


@pytest.mark.slow
def test_a_stop_signal_on_one_rank_rides_in_the_oom_agreement_one_collective_per_step(tmp_path):
    """Issue 14 (b): with OOM recovery on, a step makes ONE host-side agreement: the stop flags ride in
    the OOM agreement, and both ranks still stop together when only rank 1 got the signal. With
    recovery off, the step-end agreement alone (also one)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(ROOT / "tests" / "support" / "agreement_worker.py"), str(tmp_path)],
                          env=child_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        for mode in ("retries=2", "retries=0"):
            assert r[mode] == {"stop": "SIGUSR1", "early": False, "collectives": 1}, (r["rank"], mode, r)
