"""Asynchronous checkpoints: the training thread only takes the snapshot; the background writer's
checkpoints become visible only when complete, survive kill -9 and SIGTERM mid-write, stop every
rank cleanly when the disk refuses them, and are awaited at the end. Resume stays bit-identical.

`debug.checkpoint_write_delay_s` holds each background write with its data written but not yet
visible (logged), so a test can signal or kill the run exactly there."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_same_final_weights, children, command, child_env, launch, read_jsonl, \
    wait_until
from launcher.checkpoint import store
from launcher.checkpoint.staging import DeviceCopy, HostBuffers, Stage, flatten, rebuild
from launcher.telemetry.stalls import Stalls

MID_WRITE = "written, not visible yet"


def events(run: Path, kind: str) -> list:
    return [e for e in read_jsonl(run / "events.jsonl") if e["event"] == kind]


def losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]


def start(args, nproc=0, torchrun_args=None) -> subprocess.Popen:
    return subprocess.Popen(command(args, nproc, torchrun_args), env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout: float = 120) -> None:
    wait_until(proc, lambda: log.exists() and text in log.read_text(), f"{text!r} in {log.name}", timeout)


# ------------------------------------------------------------------------------ in one process
def test_stalls_nest_exclusively_and_are_summed_against_the_wall_time():
    stalls = Stalls()
    with stalls.measure("handoff"):
        time.sleep(0.02)
        with stalls.measure("checkpoint"):
            time.sleep(0.05)
            with stalls.measure("checkpoint"):  # the same cause inside: one stall, not two
                time.sleep(0.01)
    stalls.background("checkpoint", 1.5)
    s = stalls.summary(wall_s=1.0)
    assert s["causes"]["checkpoint"]["count"] == 1 and 0.06 <= s["causes"]["checkpoint"]["s"] < 0.1
    assert 0.02 <= s["causes"]["handoff"]["s"] < 0.05  # without the checkpoint inside it
    assert s["stalled_s"] == pytest.approx(s["causes"]["checkpoint"]["s"] + s["causes"]["handoff"]["s"], abs=2e-3)
    assert s["fraction"] == pytest.approx(s["stalled_s"], abs=1e-3) and s["background"]["checkpoint"]["s"] == 1.5


def _state():
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(300, 7, generator=g), "b": torch.randn(7, generator=g).half(),
                      "n": torch.tensor(3)},
            "optimizer": {"state": {0: {"step": torch.tensor(5.0), "m": torch.randn(300, 7, generator=g)}},
                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}]},
            "empty": torch.zeros(0, 4), "epoch": 2}


def test_a_snapshot_is_one_flat_buffer_per_dtype_each_tensor_owning_its_bytes(tmp_path):
    live = _state()
    snap = Stage(torch.device("cpu")).take(live, step=7)
    skeleton, tensors = flatten(live)
    back = rebuild(skeleton, tensors)  # the tensors back where they were, the rest as it was
    assert back["model"]["w"] is live["model"]["w"] and back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    staged = flatten(snap.state)[1]
    assert all(torch.equal(a, b) for a, b in zip(tensors, staged))
    before = live["model"]["w"].clone()
    buffers = snap.stage.buffers
    assert sorted(map(str, buffers.flat)) == ["torch.float16", "torch.float32", "torch.int64"]
    for t in staged:
        flat = buffers.flat[t.dtype]
        lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        assert t.numel() == 0 or lo <= t.data_ptr() < hi  # inside its dtype's one buffer
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # and owns exactly its bytes
    live["model"]["w"].add_(1)
    live["optimizer"]["param_groups"][0]["lr"] = 0.5
    assert torch.equal(snap.state["model"]["w"], before)  # the snapshot keeps the step's values
    assert snap.state["optimizer"]["param_groups"][0]["lr"] == 0.1  # non-tensor state is a copy too
    path = tmp_path / "s.pt"
    torch.save(snap.state, path)  # torch.save writes each tensor's own bytes, not whole flat buffers
    assert path.stat().st_size < 1.2 * sum(t.numel() * t.element_size() for t in staged) + 4096
    assert torch.equal(torch.load(path, weights_only=True)["model"]["b"], tensors[1])


def test_the_next_snapshot_waits_until_every_reader_released_the_buffers():
    stage = Stage(torch.device("cpu"))
    first = stage.take(_state(), step=1)
    release = first.lease()
    taken = threading.Event()
    threading.Thread(target=lambda: (stage.take(_state(), step=2), taken.set()), daemon=True).start()
    assert not taken.wait(0.3)  # a reader (the writer, a hand-off) still holds step 1's buffers
    release()
    release()  # a second call changes nothing
    assert taken.wait(10)


class _Recorder:
    """Stands in for torch.cuda (Stream, Event, current_stream, stream) and records the calls, so the
    GPU ordering runs on the CPU. The copies themselves are real (CPU tensors)."""

    def __init__(self):
        self.calls = []
        rec = self

        class Stream:
            def __init__(self, device=None, name="side"):
                self.name = name

            def wait_stream(self, other):
                rec.calls.append((self.name, "wait_stream", other.name))

            def wait_event(self, event):
                rec.calls.append((self.name, "wait_event", event.id))

        class Event:
            count = 0

            def __init__(self):
                Event.count += 1
                self.id = Event.count

            def record(self, stream):
                rec.calls.append((stream.name, "record", self.id))

            def synchronize(self):
                rec.calls.append(("host", "synchronize", self.id))

        self.Stream, self.Event, self.main = Stream, Event, Stream(name="main")

    def current_stream(self):
        return self.main

    def stream(self, s):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            self.calls.append((s.name, "enter"))
            yield
            self.calls.append((s.name, "exit"))
        return ctx()


class _OnDevice(torch.Tensor):
    """A CPU tensor that reports a CUDA device, so DeviceCopy takes its GPU path."""
    streams: list = []

    @property
    def device(self):
        return torch.device("cuda", 0)

    def record_stream(self, stream):
        _OnDevice.streams.append(stream.name)


def test_on_a_gpu_the_snapshot_copies_on_a_side_stream_and_the_next_optimizer_step_waits_on_the_device():
    cuda = _Recorder()
    copier = DeviceCopy(torch.device("cpu"), cuda=cuda)
    src = [torch.randn(4).as_subclass(_OnDevice), torch.randn(3).as_subclass(_OnDevice), torch.randn(2)]
    buffers = HostBuffers(src, pin=False)
    done = copier.copy(buffers.host, src, early=[True, False, False])
    assert all(torch.equal(h, s.as_subclass(torch.Tensor)) for h, s in zip(buffers.host, src))
    assert cuda.calls[0] == ("side", "wait_stream", "main")  # after the work queued so far
    early, rest = [c[2] for c in cuda.calls if c[1] == "record"]
    assert cuda.calls.index(("side", "record", early)) < cuda.calls.index(("side", "record", rest))
    assert cuda.calls[-1] == ("main", "wait_event", early)  # the forward's buffers: waited for at once
    assert done.id == rest and ("main", "wait_event", rest) not in cuda.calls  # the rest: not yet
    copier.fence()  # the training step, before its optimizer step
    copier.fence()  # a second step: nothing left to wait for
    assert cuda.calls.count(("main", "wait_event", rest)) == 1
    assert not any(c[1] == "synchronize" for c in cuda.calls)  # the training thread never waits for the host
    assert _OnDevice.streams == ["side", "side"]  # the allocator keeps each source until the side stream copied it


def test_a_step_the_gradscaler_skips_still_waits_for_the_snapshot_before_the_scale_changes():
    """fp16 with a non-fused optimizer: a step whose gradients overflow is skipped by the GradScaler, which
    then never calls optimizer.step(), so a fence hung on the optimizer's step hooks would never run, while
    scaler.update() rewrites the scale in place, a tensor the snapshot's side-stream copy reads. The training
    step (Trainer.train_step) fences explicitly before its optimizer step: the training stream's wait for
    the copy is queued before the scale changes. The CUDA ordering is recorded on the CPU (_Recorder)."""
    from launcher.batch.geometry import Batch
    from launcher.batch.recovery import Recovery
    from launcher.config.schema import AutobatchConfig, Config
    from launcher.distributed.agreement import Agreement
    from launcher.distributed.env import Env
    from launcher.distributed.groups import Dist
    from launcher.distributed.wrap import GradSync
    from launcher.ema import NoEMA
    from launcher.precision import GradScaler
    from launcher.step import StepParts
    from launcher.telemetry.off import OFF
    from launcher.train import Trainer

    class Overflow:  # a loss whose gradients are not finite: the scaler skips the step
        @staticmethod
        def loss(out, y):
            return (out * float("inf")).sum()

    cuda = _Recorder()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    scaler = GradScaler("cpu", init_scale=8.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, foreach=False)  # optim.fused=false: the skip skips step()
    steps = []
    opt.register_step_pre_hook(lambda *_: steps.append("optimizer.step"))
    real_update = scaler.update
    scaler.update = lambda *a: (cuda.calls.append(("host", "scaler.update")), real_update(*a))
    scaler.scale(torch.zeros((), requires_grad=True))  # the scale tensor exists, as after the first step
    env = Env(0, 1, 0, 1, 0, None, torch.device("cpu"))
    trainer = Trainer(Config(), env, Dist(env), None)
    trainer.job, trainer.precision, trainer.keeps_ema, trainer.model = Overflow, "fp32", False, model
    trainer.staging = Stage(torch.device("cpu"), copier=DeviceCopy(torch.device("cpu"), cuda=cuda))
    snap = trainer.staging.take({"scaler": scaler.snapshot_state(), "model": model.state_dict()}, step=1)
    assert snap.state["scaler"]["scale"].item() == 8.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recovery = Recovery(AutobatchConfig(max_retries=0), env, None, OFF, Batch(8, 8, 1), Agreement(Dist(env), env))
    parts = StepParts(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), scaler, NoEMA())
    trainer.train_step(torch.randn(8, 4), torch.zeros(8), parts, model, GradSync(model), recovery, step=0)
    assert steps == [] and scaler.get_scale() == 4.0  # skipped, and the scale was lowered in place
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    waited = ("main", "wait_event", snap.done.id)
    assert waited in cuda.calls and cuda.calls.index(waited) < cuda.calls.index(("host", "scaler.update"))


def test_the_snapshot_buffers_are_prepared_in_the_background_for_the_state_the_optimizer_step_left(tmp_path):
    """No optimizer hook: the loop calls Checkpointer.prepare() after each step. A first step the GradScaler
    skipped leaves no optimizer state, so the buffers are prepared again (in the background) once a step
    creates it; the next snapshot then copies into the prepared buffers, allocating nothing on the
    training thread. Retention runs after the commit, with the steps the save was given to protect."""
    from types import SimpleNamespace

    from launcher.checkpoint.checkpointer import Checkpointer, TrainState
    from launcher.config.schema import CheckpointConfig
    from launcher.distributed.env import Env
    from launcher.distributed.groups import Dist
    from launcher.ema import NoEMA
    from launcher.rundir import RunDir

    env = Env(0, 1, 0, 1, 0, None, torch.device("cpu"))
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    state, events = TrainState(), []
    tel = SimpleNamespace(event=lambda kind, **f: events.append((kind, f.get("step"))), wandb_id=None)
    ckpt = Checkpointer(CheckpointConfig(keep_last=1), env, Dist(env), RunDir(tmp_path).make(), tel, state,
                        parts={"model": model, "optimizer": opt, "scheduler": torch.optim.lr_scheduler.LambdaLR(
                            opt, lambda s: 1.0), "scaler": torch.amp.GradScaler("cpu", enabled=False), "ema": NoEMA()},
                        per_rank={})
    try:
        ckpt.prepare()  # after a skipped first step: no optimizer state yet
        ckpt.wait()
        first = ckpt.staging.buffers
        ckpt.prepare()
        assert ckpt.pending is None or ckpt.wait()  # nothing changed: nothing submitted again
        assert ckpt.staging.buffers is first
        model(torch.randn(4, 6)).sum().backward()
        opt.step()  # the optimizer's state exists now
        ckpt.prepare()
        ckpt.wait()
        prepared = ckpt.staging.buffers
        assert prepared is not first and prepared.nbytes > first.nbytes
        for step in (1, 2, 3):
            state.step = step
            snap = ckpt.snapshot()
            assert ckpt.staging.buffers is prepared  # the snapshot allocated nothing
            ckpt.save(snap, protect=[1])
            ckpt.wait()
        assert store.steps(tmp_path / "checkpoints") == [3, 1]  # keep_last=1, and the protected step
        assert [s for kind, s in events if kind == "checkpoint"] == [1, 2, 3]
    finally:
        ckpt.close()


def test_retention_never_deletes_the_newest_complete_checkpoint_or_a_protected_step(tmp_path):
    for step in (10, 20, 30, 40):
        store.save(tmp_path, step, {"step": step})
    inflight = tmp_path / ".step-00000050.pt.abcd.tmp"  # a save being written (or killed mid-write)
    inflight.write_bytes(b"half")
    store.prune(tmp_path, keep_last=1, protect=[20])
    assert store.steps(tmp_path) == [40, 20] and inflight.exists()
    store.save(tmp_path, 50, {"step": 50})  # the next save sweeps the dead one
    store.prune(tmp_path, keep_last=1, protect=[20])  # after that commit (Checkpointer.retain)
    assert store.steps(tmp_path) == [50, 20] and not inflight.exists()


# --------------------------------------------------------------------------- real processes
@pytest.mark.slow
def test_kill_9_mid_write_leaves_no_complete_checkpoint_resume_is_exact_and_the_end_waits(reference, tmp_path):
    """kill -9 while step 40's checkpoint is written but not visible: step 20 is the newest complete one.
    The relaunch resumes there bit-identically, and its end waits for the saves still in flight."""
    run, delay = tmp_path / "run", "debug.checkpoint_write_delay_s=1.5"
    proc = start(["train", *FAST, f"run.dir={run}", "checkpoint.every_steps=20", delay])
    try:
        wait_for_log(proc, run / "logs" / "rank-0.log", f"checkpoint of step 40 {MID_WRITE}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    ckpts = run / "checkpoints"
    assert store.steps(ckpts) == [20] and list(ckpts.glob(".step-00000040.pt.*.tmp"))  # written, never committed
    assert [e["step"] for e in events(run, "checkpoint")] == [20]
    launch(["train", *FAST, f"run.dir={run}", "checkpoint.every_steps=60", delay])
    assert [e["step"] for e in events(run, "resume")] == [20]
    assert losses(run) == losses(reference[1])
    assert_same_final_weights(run, reference[1])
    rows = read_jsonl(run / "events.jsonl")
    end = next(i for i, e in enumerate(rows) if e["event"] == "end")
    saved = [(e["step"], e["write_s"]) for e in rows[:end] if e["event"] == "checkpoint"]
    assert [s for s, _ in saved] == [20, 60, 62, 120, 124] and all(w >= 1.5 for _, w in saved[1:])
    assert store.steps(ckpts) == [124, 120, 62] and not list(ckpts.glob(".*.tmp"))
    stalls = read_jsonl(run / "events.jsonl")[end]["stall_by_cause"]
    assert stalls["causes"]["checkpoint"]["s"] >= 1.5  # the end waited for the last write
    assert stalls["background"]["checkpoint"]["count"] == 4 and stalls["wall_s"] > 0


@pytest.mark.slow
def test_sigterm_mid_write_finishes_that_write_then_checkpoints_the_stop_step_on_every_rank(reference, tmp_path):
    run = tmp_path / "run"
    args = ["train", *FAST, "validation.mode=inline", f"run.dir={run}", "checkpoint.every_steps=20"]
    proc = start([*args, "debug.checkpoint_write_delay_s=1.5"], nproc=2)
    try:
        wait_for_log(proc, run / "logs" / "rank-0.log", f"checkpoint of step 40 {MID_WRITE}")
        proc.send_signal(signal.SIGTERM)  # the agent forwards it to both workers
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, out
    [pre] = events(run, "preempt")
    assert pre["signal"] == "SIGTERM" and pre["exit_code"] == 143
    saved = [e["step"] for e in events(run, "checkpoint")]
    assert saved == [20, 31, 40, pre["step"]] and pre["step"] > 40  # 31: validation; 40: the write in flight
    assert store.steps(run / "checkpoints")[0] == pre["step"]
    launch(args, nproc=2)
    assert [e["step"] for e in events(run, "resume")] == [pre["step"]]
    assert losses(run) == losses(reference["ddp"])
    assert_same_final_weights(run, reference["ddp"])


@pytest.mark.slow
def test_a_checkpoint_dir_made_read_only_mid_run_stops_cleanly_with_one_line_and_keeps_the_last(tmp_path):
    """The write fails in the background; the next step's agreement stops the run (every rank, in a
    multi-rank run: test_fault_tolerance's full disk) with exit status 1 and one line."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is missing; root ignores chmod, so there is no way to make a directory unwritable")
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    proc = start(["train", *FAST, "debug.step_delay_s=0.05", f"run.dir={run}", "checkpoint.every_steps=20"])
    try:
        deadline = time.time() + 120
        while not (ckpts / "step-00000020.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if subprocess.run(["chattr", "+i", str(ckpts)], capture_output=True).returncode != 0:
            pytest.skip("this file system does not support chattr +i")
        out, _ = proc.communicate(timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(ckpts)], check=False)
        proc.kill()
    assert proc.returncode == 1, out[-3000:]
    [line] = [ln for ln in out.splitlines() if ln.startswith("launcher: error:")]
    assert "Traceback" not in out and "could not save checkpoint" in line and "step-00000040.pt" in line
    assert "Operation not permitted" in line and "the previous checkpoint step-00000020.pt is intact" in line
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000020.json", "step-00000020.pt"]
    assert [e["step"] for e in events(run, "checkpoint_failed")] == [40]
    assert not (run / "summary.json").exists()


@pytest.mark.slow
def test_fsdp_kill_9_mid_write_then_torchrun_restart_resumes_exactly(tmp_path):
    """fsdp, 2 ranks: rank 0 is killed while step 40's directory is written but not committed; torchrun
    restarts the group, which resumes from step 20 and ends equal to a run never interrupted."""
    args = ["train", *FAST, "train.strategy=fsdp", "validation.mode=off", "checkpoint.every_steps=20"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    launch([*args, f"run.dir={ref}"], nproc=2)
    proc = start([*args, f"run.dir={run}", "debug.checkpoint_write_delay_s=1.5"], nproc=2,
                 torchrun_args=["--max-restarts=1", "--monitor-interval=0.5"])
    try:
        wait_for_log(proc, run / "logs" / "rank-0.log", f"checkpoint of step 40 {MID_WRITE}")
        assert (run / "checkpoints" / "step-00000040.dcp.tmp").is_dir() and store.steps(run / "checkpoints") == [20]
        workers = children(proc.pid)
        ranks = {pid: (Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")) for pid in workers}
        [rank0] = [pid for pid, env in ranks.items() if b"RANK=0" in env]
        os.kill(rank0, signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert [e["step"] for e in events(run, "resume")] == [20]
    assert losses(run) == losses(ref)
    last = store.steps(ref / "checkpoints")[0]  # 2 ranks: 62 steps
    assert store.steps(run / "checkpoints")[0] == last == 62
    a, b = (store.load(store.path_for(r / "checkpoints", last)) for r in (ref, run))
    for part in ("model", "ema"):
        sa, sb = a[part], b[part]
        sa, sb = sa.get("shadow", sa), sb.get("shadow", sb)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
