"""Asynchronous validation (issue 5), with real processes: torchrun ranks, the spawned
validator child, the standalone `launcher validate`, real files corrupted and real kills."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, child_env, command, launch, read_jsonl
from launcher.validation import control
from tests.support.handoff import idle, put, snapshot
from launcher.checkpoint.staging import Stage
from launcher.validation import handoff
from launcher.files import JsonlTail

ARGS = ["train", *FAST, "checkpoint.every_steps=0"]
# Steps that sleep 20 ms, like GPU-bound ones: how long training lasts does not depend on the shared CPUs.
SLEEPY = [a for a in ARGS if not a.startswith("job.model")] + [
    "job=custom", "job.target=tests.support.sleepy_job:SleepyJob", "+job.params.sleep_s=0.02"]


def results(run_dir: Path, **match) -> list:
    return [r for r in read_jsonl(run_dir / "val" / "results.jsonl") if all(r.get(k) == v for k, v in match.items())]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ---------------------------------------------------------------- the queue itself (in-process, real files)

def test_queue_policies_and_retention(tmp_path):
    """latest: the newest is claimed and older unclaimed ones dropped (recorded); all: FIFO, nothing dropped."""
    (tmp_path / "val").mkdir()
    w = handoff.Writer(tmp_path, "all", keep=2)
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    stage = Stage(torch.device("cpu"))
    for step in (10, 20, 30):
        assert put(w, step, {"ema": state}, stage) is not None
        state["w"] += 1  # the next "EMA update" must not reach an earlier snapshot
    w.flush()
    q = tmp_path / "handoff"
    assert handoff.pending(q) == [10, 20, 30]
    snap = handoff.claim(q, "all")
    manifest, states = snap.load()
    assert (snap.step, manifest.weights) == (10, ["ema"])
    assert torch.equal(states["ema"]["w"], torch.arange(6.0).reshape(2, 3)) and int(states["ema"]["n"]) == 3
    snap.ack()
    assert not handoff.data_path(q, 10).exists() and handoff.settled(q, 10)

    snap = handoff.claim(q, "latest")  # newest: 30; 20 is stale and dropped
    assert snap.step == 30 and handoff.pending(q) == []
    assert not handoff.data_path(q, 20).exists() and handoff.data_path(q, 30).exists()
    assert [(r["step"], r["reason"]) for r in read_jsonl(tmp_path / "val" / "skipped.jsonl")] == [(20, "stale")]

    handoff.recover(q)  # a validator that died holding 30 gives it back
    assert handoff.pending(q) == [30]

    # The writer bounds the queue under latest: only `keep` unclaimed snapshots stay.
    w = handoff.Writer(tmp_path, "latest", keep=2)
    for step in (40, 50, 60):
        assert put(w, step, {"raw": state}, stage) is not None
        while not idle(w):
            time.sleep(0.01)
    w.flush()
    assert handoff.pending(q) == [50, 60]
    tail = JsonlTail(tmp_path / "val" / "skipped.jsonl")
    assert [(r["step"], r["reason"]) for r in tail.read()] == [(20, "stale"), (30, "stale"), (40, "stale")]
    assert tail.read() == []  # only new lines, never re-read


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_rank_validator_validates_every_interval(run_dir):
    """2-rank torchrun: rank 1 validates every hand-off (policy=all); best, retention, summary agree."""
    launch(ARGS + [f"run.dir={run_dir}", "train.max_steps=30", "validation.every_steps=10",
                   "validation.policy=all", "validation.weights=both", "checkpoint.every_steps=10",
                   "checkpoint.keep_last=1"], nproc=2)
    s = summary(run_dir)
    assert [r["step"] for r in results(run_dir, weights="ema")] == [10, 20, 30]
    assert [r["step"] for r in results(run_dir, weights="raw")] == [10, 20, 30]
    best = json.loads((run_dir / "best" / "best.json").read_text())
    ema_acc = {r["step"]: r["metrics"]["acc"] for r in results(run_dir, weights="ema")}
    assert best["value"] == max(ema_acc.values()) and ema_acc[best["step"]] == best["value"]
    assert (s["best_step"], s["best_value"]) == (best["step"], best["value"])
    assert s["validated_steps"] == 3 and s["unvalidated_steps"] == [] and s["stale_steps"] == []
    assert (run_dir / "best" / "model.safetensors").exists()
    # Validated snapshots are gone from the queue; checkpoints keep the last one plus the best.
    assert not list((run_dir / "handoff").glob("*.safetensors*"))
    kept = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert kept == sorted({30, best["step"]})
    # Results reached the trainer, which read them without blocking and logged them.
    trainer_log = (run_dir / "logs" / "rank-0.log").read_text()
    assert all(f"val step={st} weights=ema" in trainer_log for st in (10, 20, 30))
    blocked = [e["blocked_ms"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "handoff"]
    assert len(blocked) == 3 and s["handoff_blocked_ms"]["max"] == pytest.approx(max(blocked), abs=1e-3)


@pytest.mark.slow
@pytest.mark.serial  # it compares run times
def test_async_does_not_slow_training_but_inline_does(tmp_path):
    """A validation slower than a training interval: async (process) stays within 10% of off, inline pays it.
    Also: policy=latest skips the stale snapshots, and the drain still validates the final one.
    Each step sleeps 20 ms like a GPU-bound step, so the shared CPUs' noise does not decide the result."""
    base = SLEEPY + ["train.epochs=20", "train.max_steps=400", "validation.every_steps=100", "debug.val_delay_s=3",
                   "train.log_every=50", "validation.policy=latest", "validation.queue=1"]
    wall = {}
    for mode in ("off", "process", "inline"):
        d = tmp_path / mode
        launch(base + [f"run.dir={d}", f"validation.mode={mode}"])
        wall[mode] = summary(d)["wall_time_s"]
    print("wall times:", wall)
    assert wall["process"] <= 1.10 * wall["off"], wall
    assert wall["inline"] >= wall["off"] + 0.8 * 4 * 3, wall  # four blocking validations of >= 3 s
    s = summary(tmp_path / "process")
    validated = [r["step"] for r in results(tmp_path / "process")]
    assert validated[-1] == 400 and s["unvalidated_steps"] == []  # the drain validated the final weights
    assert not set(s["stale_steps"]) & set(validated)  # policy=latest: a skipped step is never validated


@pytest.mark.slow
def test_early_stop_stops_every_training_rank_at_the_same_step(run_dir):
    """3 ranks: 2 train, 1 validates; the validator asks to stop and both trainers stop at one step."""
    launch(ARGS + [f"run.dir={run_dir}", "train.epochs=1000", "train.max_steps=20000", "validation.every_steps=5",
                   "validation.queue=1", "early_stop.patience=1", "early_stop.min_delta=10"], nproc=3)
    s = summary(run_dir)
    assert s["stopped_early"] and s["steps"] < 20000
    stop = json.loads((run_dir / "handoff" / "stop.json").read_text())
    assert stop["step"] == results(run_dir)[1]["step"]  # the 2nd validation cannot improve by 10: stop
    stops = []
    for rank in (0, 1):
        lines = [ln for ln in (run_dir / "logs" / f"rank-{rank}.log").read_text().splitlines() if "early stop at" in ln]
        stops.append(lines[-1].split("early stop at step ")[1])
    assert stops[0] == stops[1] == str(s["steps"]) and s["steps"] >= stop["step"]
    assert results(run_dir)[-1]["step"] == s["steps"]  # the drain validated where training stopped
    # policy=latest with a 5-step interval: the validator skipped stale snapshots, and says so.
    skipped = {r["step"]: r["reason"] for r in read_jsonl(run_dir / "val" / "skipped.jsonl")}
    assert s["stale_steps"] and all(skipped[st] == "stale" for st in s["stale_steps"])
    assert not set(s["stale_steps"]) & {r["step"] for r in results(run_dir)}


@pytest.mark.slow
def test_killed_validator_does_not_stop_training_and_a_new_one_picks_up(run_dir):
    """SIGKILL the spawned validator mid-run: training finishes, says what went unvalidated;
    `launcher validate` then validates exactly those snapshots."""
    args = SLEEPY + [f"run.dir={run_dir}", "validation.mode=process", "train.epochs=100", "train.max_steps=1000",
                     "validation.every_steps=100", "validation.policy=all", "train.log_every=50"]
    proc = subprocess.Popen(command(args), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (control.read_status(run_dir) or {}).get("pid"):
            time.sleep(0.1)
        os.kill(control.read_status(run_dir)["pid"], signal.SIGKILL)  # the validator, once it runs
        assert not (run_dir / "summary.json").exists(), "training ended before the kill: the test proves nothing"
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    s = summary(run_dir)
    assert s["steps"] == 1000
    done = {r["step"] for r in results(run_dir)}
    assert s["unvalidated_steps"] and s["unvalidated_steps"] == [st for st in range(100, 1001, 100) if st not in done]
    assert out.count("the validator is gone") == 1
    assert [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "validator_down"]

    launch(["validate", f"run.dir={run_dir}"])  # a restarted validator picks up where it stopped
    assert sorted(r["step"] for r in results(run_dir)) == list(range(100, 1001, 100))  # each exactly once
    assert not list((run_dir / "handoff").glob("*.safetensors"))


@pytest.mark.slow
def test_standalone_validate_skips_corrupt_snapshots_and_revalidates_checkpoints(run_dir):
    launch(ARGS + [f"run.dir={run_dir}", "validation.mode=off", "train.max_steps=20",
                   "checkpoint.every_steps=10"])
    # Three snapshots in the queue of the finished run, written by the real writer; two get damaged.
    from safetensors.torch import load_file

    state = load_file(str(run_dir / "ema.safetensors"))
    w = handoff.Writer(run_dir, "all", keep=2)
    for step in (100, 200, 300):
        put(w, step, {"ema": state})
    w.flush()
    q = run_dir / "handoff"
    flipped = bytearray(handoff.data_path(q, 100).read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    handoff.data_path(q, 100).write_bytes(bytes(flipped))
    with open(handoff.data_path(q, 200), "r+b") as f:
        f.truncate(100)

    proc = launch(["validate", f"run.dir={run_dir}", "validation.policy=all"])
    assert [r["step"] for r in results(run_dir)] == [300]
    bad = {r["step"]: r for r in read_jsonl(run_dir / "val" / "skipped.jsonl")}
    assert bad[100]["reason"] == bad[200]["reason"] == "corrupt"
    assert "sha256" in bad[100]["detail"] and "size" in bad[200]["detail"]
    assert handoff.data_path(q, 100).with_name("00000100.safetensors.bad").exists()
    assert "corrupt" in proc.stdout + proc.stderr

    # Nothing left in the queue of a finished run: re-validate every checkpoint.
    launch(["validate", f"run.dir={run_dir}", "validation.weights=raw"])
    again = results(run_dir, source="checkpoint")
    assert sorted((r["step"], r["weights"]) for r in again) == [(10, "raw"), (20, "raw")]


@pytest.mark.slow
def test_bad_validation_input_is_one_line_and_status_2(tmp_path):
    p = launch(["train", *FAST, "validation.device=gpu7", f"run.dir={tmp_path}/r"], check=False)
    assert p.returncode == 2 and "validation.device" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = launch(["validate"], check=False)
    assert p.returncode == 2 and "run.dir" in p.stderr
    p = launch(["validate", f"run.dir={tmp_path}/nowhere"], check=False)
    assert p.returncode == 2 and "config.yaml" in p.stderr


# ---------------------------------------------------------------- no host stalls; a validator that keeps up (issue 14)

def test_the_writer_copies_the_weights_out_of_the_snapshot_and_no_snapshot_waits_for_a_file(tmp_path):
    """The hand-off path training takes: put() hands the checkpoint's snapshot of the step to the Writer,
    which copies the weights out of the snapshot's buffers into memory of its own and releases them at
    once, so the next snapshot never waits while a hand-off file is still being written (here: held by
    a write that does not return). Written files are the weights of their step; once warm, the copies
    reuse the writer's memory (no allocation per hand-off)."""
    (tmp_path / "val").mkdir()
    writing, held = threading.Event(), threading.Event()

    def slow_disk(step, blocked_s, write_s):  # the write thread, a file on disk: held until released
        writing.set()
        assert held.wait(60)

    w = handoff.Writer(tmp_path, "all", keep=2, on_written=slow_disk)
    stage = Stage(torch.device("cpu"))
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor(3)}
    first = snapshot(stage, 1, {"ema": state})
    assert w.put(1, 0, first, first.weights) is not None
    assert writing.wait(60)  # step 1's write is in progress and does not return
    staged = {k: t.data_ptr() for k, t in first.weights["ema"].items()}
    for step in (2, 3):
        state["w"] += 1
        taken = threading.Event()
        threading.Thread(target=lambda step=step, taken=taken: (
            w.put(step, 0, s := snapshot(stage, step, {"ema": state}), s.weights), taken.set()), daemon=True).start()
        assert taken.wait(30), "a snapshot waited for a hand-off file being written"
    assert not w.idle() and handoff.pending(tmp_path / "handoff") == [1]  # 2 and 3 wait behind step 1's write
    held.set()
    w.flush()
    assert handoff.pending(tmp_path / "handoff") == [1, 2, 3]
    for step in (1, 2, 3):
        manifest, states = handoff.claim(tmp_path / "handoff", "all").load()
        assert manifest.step == step and torch.equal(states["ema"]["w"], torch.arange(6.0).reshape(2, 3) + step - 1)
        assert torch.equal(states["ema"]["b"], state["b"]) and int(states["ema"]["n"]) == 3
    assert all(t.data_ptr() == staged[k] for k, t in stage.take({"weights": {"ema": state}}, 4).state["weights"]
               ["ema"].items())  # the snapshots were the stage's own buffers, not copies the Writer made
    kept = [{k: t.data_ptr() for k, t in spare.items()} for spare in w.spare]
    again = handoff.Writer(tmp_path, "all", keep=2)
    again.spare = w.spare
    put(again, 5, {"ema": state}, stage)
    again.flush()
    assert [{k: t.data_ptr() for k, t in spare.items()} for spare in again.spare][0] in kept  # reused


def test_under_policy_latest_a_hand_off_behind_two_unwritten_ones_is_skipped_as_busy(tmp_path):
    """policy=latest bounds what a slow disk costs: a hand-off that comes while two are still outstanding
    (one file being written, one waiting) is skipped (val/skipped.jsonl `busy`) and training goes on;
    under policy=all every one is queued."""
    (tmp_path / "val").mkdir()
    held = threading.Event()
    w = handoff.Writer(tmp_path, "latest", keep=5, on_written=lambda *_: held.wait(60))
    state = {"w": torch.zeros(4)}
    assert put(w, 1, {"ema": state}) is not None and put(w, 2, {"ema": state}) is not None
    assert put(w, 3, {"ema": state}) is None
    held.set()
    w.flush()
    assert handoff.pending(tmp_path / "handoff") == [1, 2] and w.submitted == [1, 2]
    assert [(r["step"], r["reason"]) for r in read_jsonl(tmp_path / "val" / "skipped.jsonl")] == [(3, "busy")]
    held.clear()
    w = handoff.Writer(tmp_path, "all", keep=5, on_written=lambda *_: held.wait(60))
    assert all(put(w, step, {"ema": state}) is not None for step in (4, 5, 6))
    held.set()
    w.flush()
    assert handoff.pending(tmp_path / "handoff") == [1, 2, 4, 5, 6]


NHWC = [a for a in ARGS if not a.startswith("job.model")] + [
    "job=custom", "job.target=tests.support.nhwc_job:NhwcJob", "batch.size=32", "train.epochs=0", "train.max_steps=6",
    "validation.every_steps=3", "validation.batch_size=64", "validation.policy=all"]


@pytest.mark.parametrize("mode,train_nhwc", [("process", "true"), ("inline", "false")])
@pytest.mark.slow
def test_channels_last_in_the_device_copy_and_validation_throughput(tmp_path, mode, train_nhwc):
    """train.channels_last converts each batch in its copy to the device, never on the host (the job's
    images refuse a host-side conversion, its model an input that is not NHWC); a conv net evaluates
    NHWC either way; every results row carries the evaluation's samples_per_s."""
    run = tmp_path / "r"
    launch([*NHWC, f"validation.mode={mode}", f"train.channels_last={train_nhwc}", f"run.dir={run}"])
    rows = results(run)
    assert [r["step"] for r in rows] == [3, 6] and all(r["samples_per_s"] > 0 for r in rows)
