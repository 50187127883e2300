"""Exact resume: a killed and relaunched run equals one that never stopped, bit for bit."""
import json

import pytest
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    # The newest valid one: step 80, a validation step (every validation step checkpoints).
    assert [e["step"] for e in events if e["event"] == "resume"] == [80]
    _same_run(ref, run)


def test_resume_must_without_checkpoint_exits_2(tmp_path):
    proc = launch(["train", *FAST, "run.resume=must", f"run.dir={tmp_path}/r"], check=False)
    assert proc.returncode == 2 and "run.resume=must" in proc.stderr


@pytest.mark.slow
def test_resume_never_starts_fresh(tmp_path):
    launch(["train", *FAST, "train.epochs=1", f"run.dir={tmp_path}/r"])
    launch(["train", *FAST, "train.epochs=1", "run.resume=never", f"run.dir={tmp_path}/r"])
    starts = [e["start_step"] for e in read_jsonl(tmp_path / "r" / "events.jsonl") if e["event"] == "start"]
    assert starts == [0, 0]


@pytest.mark.slow
def test_resume_with_changed_options_keeps_the_config_records_and_refuses_breaking_ones(tmp_path):
    """Issue 15 item 10: config.yaml stays the first launch's; each resume's changes are on the console,
    in config-history.yaml and a config_changed event; model/batch geometry/seed changes exit 2."""
    import yaml

    run = tmp_path / "run"
    short = [*FAST, "validation.mode=off", f"run.dir={run}"]
    launch(["train", *short, "train.max_steps=6"])
    original = (run / "config.yaml").read_text()
    lr = yaml.safe_load(original)["optim"]["lr"]
    # A change that keeps exactness: recorded, shown, config.yaml untouched.
    proc = launch(["train", *short, "train.max_steps=10", "optim.lr=0.02"])
    assert "train.max_steps: 6 -> 10" in proc.stderr and f"optim.lr: {lr} -> 0.02" in proc.stderr
    assert (run / "config.yaml").read_text() == original
    [entry] = list(yaml.safe_load_all((run / "config-history.yaml").read_text()))
    assert entry["changes"] == {"optim.lr": {"old": lr, "new": 0.02}, "train.max_steps": {"old": 6, "new": 10}}
    [event] = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "config_changed"]
    assert event["changes"] == entry["changes"]
    # The same options again: nothing changed since the last resume, nothing recorded.
    launch(["train", *short, "train.max_steps=10", "optim.lr=0.02"])
    assert len(list(yaml.safe_load_all((run / "config-history.yaml").read_text()))) == 1
    # Changes that break exact resume: one line, exit 2, nothing touched.
    events = (run / "events.jsonl").read_text()
    for bad in (["batch.size=32"], ["job.model=cnn"], ["run.seed=1"]):
        proc = launch(["train", *short, "train.max_steps=10", "optim.lr=0.02", *bad], check=False)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert bad[0].split("=")[0] in lines[0] and "run.allow_changes=true" in lines[0]
        assert (run / "events.jsonl").read_text() == events
    # Unless the user says so.
    proc = launch(["train", *short, "train.max_steps=12", "optim.lr=0.02", "batch.size=32", "run.allow_changes=true"])
    last = list(yaml.safe_load_all((run / "config-history.yaml").read_text()))[-1]
    assert last["allowed_breaking"] == ["batch.size"] and "not exact" in proc.stderr
    assert (run / "config.yaml").read_text() == original
    # Without a checkpoint to resume from, nothing is checked: a new config.yaml.
    launch(["train", *short, "train.max_steps=3", "batch.size=16", "run.resume=never"])
    assert "size: 16" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("mode", ["process", "inline"])
@pytest.mark.slow
def test_the_best_steps_full_checkpoint_is_kept_and_loads(tmp_path, mode):
    """Issue 15 item 14: checkpoints keep the last K plus the best. Every validation step writes one,
    so the best step has one; retention keeps it, and drops the other older ones."""
    from launcher.checkpoint import store

    run = tmp_path / "run"
    # The loss falls as it trains, so with goal=max the best validation is an early one, not the last.
    launch(["train", *FAST, "validation.every_steps=10", "validation.metric=loss", "validation.goal=max",
            "validation.policy=all", f"validation.mode={mode}", "checkpoint.every_steps=0",
            "checkpoint.keep_last=2", f"run.dir={run}"])
    best = json.loads((run / "best" / "best.json").read_text())["step"]
    saved = sorted({e["step"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "checkpoint"})
    assert saved == [*range(10, 121, 10), 124]  # every validation step, and the end
    assert best not in saved[-2:]
    kept = store.steps(run / "checkpoints")
    assert sorted(kept) == sorted({best, *saved[-2:]})
    state = store.load(store.path_for(run / "checkpoints", best))
    assert state["step"] == best and "model" in state and "optimizer" in state
