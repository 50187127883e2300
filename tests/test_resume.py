"""Exact resume: a killed and relaunched run equals one that never stopped, bit for bit."""
import torch

from conftest import FAST, final_weights, launch, read_jsonl

ARGS = [*FAST, "checkpoint.every_steps=25", "checkpoint.keep_last=2", "validation.every_steps=40",
        "ema.tau=20"]


def _same_run(a, b):
    wa, wb = final_weights(a), final_weights(b)
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    for k in wa["ema"]["shadow"]:
        assert torch.equal(wa["ema"]["shadow"][k], wb["ema"]["shadow"][k]), k
    assert wa["ema"]["updates"] == wb["ema"]["updates"]
    ma = [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(a / "metrics.jsonl")]
    mb = [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(b / "metrics.jsonl")]
    assert ma == mb


def test_killed_mid_epoch_then_resumed_is_bit_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    launch(["train", *ARGS, f"run.dir={ref}"])
    # Step 75 is mid-epoch (62 steps per epoch); the process dies hard right after checkpointing.
    died = launch(["train", *ARGS, "debug.fail_at_step=75", f"run.dir={run}"], check=False)
    assert died.returncode == 13, died.stderr
    assert not (run / "summary.json").exists()
    launch(["train", *ARGS, "debug.fail_at_step=75", f"run.dir={run}"])  # fires once per run
    resumes = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert [e["step"] for e in resumes] == [75]
    _same_run(ref, run)


def test_corrupt_newest_checkpoint_is_skipped(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    launch(["train", *ARGS, f"run.dir={ref}"])
    launch(["train", *ARGS, "debug.fail_at_step=100", f"run.dir={run}"], check=False)
    newest = run / "checkpoints" / "step-00000100.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64  # silent corruption in the middle
    newest.write_bytes(bytes(data))
    launch(["train", *ARGS, f"run.dir={run}"])
    events = read_jsonl(run / "events.jsonl")
    assert any(e["event"] == "checkpoint_skipped" and "step-00000100" in e["reason"] for e in events)
    assert [e["step"] for e in events if e["event"] == "resume"] == [75]
    _same_run(ref, run)


def test_resume_must_without_checkpoint_exits_2(tmp_path):
    proc = launch(["train", *FAST, "run.resume=must", f"run.dir={tmp_path}/r"], check=False)
    assert proc.returncode == 2 and "run.resume=must" in proc.stderr


def test_resume_never_starts_fresh(tmp_path):
    launch(["train", *FAST, "train.epochs=1", f"run.dir={tmp_path}/r"])
    launch(["train", *FAST, "train.epochs=1", "run.resume=never", f"run.dir={tmp_path}/r"])
    starts = [e["start_step"] for e in read_jsonl(tmp_path / "r" / "events.jsonl") if e["event"] == "start"]
    assert starts == [0, 0]
