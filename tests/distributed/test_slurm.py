"""The sbatch scripts on a real Slurm (slurm/local-cluster.sh start gives a one-node one).

CPU settings and small runs: the local node has the machine's cores, no GPUs. A requeued job
waits about two minutes before Slurm starts it again (its begin time); the tests move that
begin time to now with `scontrol update`, as an administrator would, to keep them short.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, ROOT, assert_same_final_weights, child_env, free_port, read_jsonl
from test_fault_tolerance import SLOW, events, losses  # beside this file


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and re.search(r"idle|mix|alloc", out.stdout) is not None


pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.serial, pytest.mark.skipif(
    not _slurm_answers(), reason="no usable Slurm: `sinfo` does not answer (start one: slurm/local-cluster.sh start)")]


def sbatch(script: str, args: list, tmp_path: Path, options: list = (), **env) -> str:
    environment = child_env({"LAUNCHER_PYTHON": sys.executable, **env})
    out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out",
                          *options, f"slurm/{script}", *args], cwd=ROOT, env=environment,
                         capture_output=True, text=True)
    if not out.stdout.strip():  # with --wait the status is the job's; without an id, submission failed
        raise AssertionError(f"sbatch {script} failed: {out.stderr}")
    return out.stdout.strip().split(";")[0]


def job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job_id: str, done, what: str, timeout: float = 240, release: bool = True) -> dict:
    """Poll until done(job info); a requeued job held for its begin time is released at once."""
    deadline, held_since = time.time() + timeout, None
    while time.time() < deadline:
        info = job(job_id)
        if done(info):
            return info
        held = release and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime"
        held_since = (held_since or time.time()) if held else None
        # Released at once, Slurm may start it before the old credential is revoked ("non-startable").
        if held and time.time() - held_since > 5:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job {job_id} {info.get('JobState')}: {info}")
        time.sleep(0.2)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id}: not {what} within {timeout}s: {job(job_id)}")


def wait_for_step(job_id: str, run: Path, step: int) -> None:
    wait_for(job_id, lambda _: any(r["step"] >= step for r in read_jsonl(run / "metrics.jsonl")), f"at step {step}")


def test_train_sbatch_requeues_on_its_signal_and_on_scontrol_requeue(reference, tmp_path):
    run = tmp_path / "run"
    job_id = sbatch("train.sbatch", [*FAST, *SLOW, f"run.dir={run}", "checkpoint.every_steps=1000"],
                    tmp_path, NPROC="2")
    try:
        # 1. The time-limit warning: what --signal=B:USR1@<s> sends, now. The job checkpoints and requeues itself.
        wait_for_step(job_id, run, 20)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        wait_for(job_id, lambda i: i.get("Restarts") == "1", "requeued by itself")
        # 2. An administrator (or preemption) requeues it mid-run: Slurm sends SIGTERM to every process.
        wait_for(job_id, lambda i: len(events(run, "resume")) == 1 and i.get("JobState") == "RUNNING", "resumed")
        first = events(run, "resume")[0]["step"]
        wait_for_step(job_id, run, first + 15)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        info = wait_for(job_id, lambda i: i.get("JobState") == "COMPLETED", "completed", timeout=300)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", log[-3000:]
    assert f"requeueing job {job_id}" in log
    stops, resumes = events(run, "preempt"), events(run, "resume")
    assert [p["signal"] for p in stops] == ["SIGTERM", "SIGTERM"]
    assert [r["step"] for r in resumes] == [p["step"] for p in stops]  # no step lost
    assert losses(run) == losses(reference[2])
    assert_same_final_weights(run, reference[2])


def test_multinode_sbatch_two_agents_rendezvous(reference, tmp_path):
    """Two srun tasks on the one local node stand for two nodes: two torchrun agents, c10d rendezvous."""
    run = tmp_path / "run"
    job_id = sbatch("multinode.sbatch", [*FAST, f"run.dir={run}"], tmp_path,
                    options=["--nodes=1", "--ntasks-per-node=2"], NPROC="1", RDZV_PORT=str(free_port()))
    try:
        info = wait_for(job_id, lambda i: i.get("JobState") == "COMPLETED", "completed", timeout=300)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    assert info["ExitCode"] == "0:0"
    [start] = events(run, "start")
    # The validator rule across agents: the last global rank (the second "node") validates.
    assert start["world"] == 2 and start["train_world"] == 1
    assert "rank-0.log" in {p.name for p in (run / "logs").iterdir()}
    assert (run / "val" / "results.jsonl").read_text().strip()
    assert_same_final_weights(run, reference[2])


def test_validate_sbatch_runs_the_validator_on_a_run_dir(reference, tmp_path):
    job_id = sbatch("validate.sbatch", [f"run.dir={reference[1]}"], tmp_path, options=["--wait"])
    info = job(job_id)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    if "not built yet" in log:
        pytest.skip("`launcher validate` is not built on this branch (issue 5)")
    assert info.get("ExitCode") == "0:0", log[-3000:]


def test_sweep_on_slurm_is_one_array_task_per_point(tmp_path):
    """`launcher train -m ... hydra/launcher=slurm`: slurm/sweep.sbatch, one array task per point, each
    running torchrun on its point in <sweep dir>/<n>; the tasks record their status and the summary."""
    from tests.conftest import launch

    sweep = tmp_path / "sweep"
    proc = launch(["train", "-m", "optim.lr=0.001,0.01", *FAST, "train.max_steps=12", f"run.dir={sweep}",
                   "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"], env={"NPROC": "1"}, timeout=120)
    job_id = re.search(r"array job (\d+)", proc.stdout).group(1)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            data = json.loads((sweep / "sweep.json").read_text())
            if all(p["status"] not in ("pending", "requeued") for p in data["points"]):
                break
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    logs = "".join(p.read_text() for p in sweep.glob("slurm-*.out"))
    assert [p["status"] for p in data["points"]] == ["completed", "completed"], logs[-3000:]
    assert data["slurm_job"] == job_id and data["best"] is not None
    for n, lr in enumerate(("0.001", "0.01")):
        assert f"lr: {lr}" in (sweep / str(n) / "config.yaml").read_text()
        assert (sweep / f"slurm-{job_id}_{n}.out").exists()
    assert "torch.distributed.run" in logs  # torchrun inside each task
