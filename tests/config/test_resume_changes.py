"""A resume that changes options trains with them: every change it announces is applied (issue 27, item 1).

A checkpoint restores the optimizer's and the scheduler's settings along with their state; the config's
must win, or `optim.lr: 0.01 -> 0.001` is printed and recorded but training goes on at 0.01.
"""
import pytest
import torch

from conftest import FAST, launch, read_jsonl
from launcher.optim import lr_factor

FIRST = [*FAST, "validation.mode=inline", "train.max_steps=20", "validation.every_steps=10",
         "checkpoint.every_steps=10"]
# Everything a user changes for a last phase: LR, weight decay, beta1, the schedule, the EMA, the cadences.
CHANGED = [*FAST, "validation.mode=inline", "train.max_steps=40", "optim.lr=0.001", "optim.weight_decay=0.2",
           "optim.momentum=0.8", "sched.min_lr=0.5", "ema.ramp=none", "ema.decay=0.5", "validation.every_steps=5",
           "checkpoint.every_steps=8", "train.log_every=5"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    run = tmp_path_factory.mktemp("changes") / "run"
    launch(["train", *FIRST, f"run.dir={run}"])
    proc = launch(["train", *CHANGED, f"run.dir={run}"])
    return run, proc


@pytest.mark.slow
def test_the_resume_announces_the_changes(resumed):
    _, proc = resumed
    assert "optim.lr: 0.01 -> 0.001" in proc.stderr and "ema.decay: 0.9999 -> 0.5" in proc.stderr


def test_the_changed_learning_rate_and_schedule_are_applied(resumed):
    run, _ = resumed
    rows = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    assert [s for s in rows if s <= 20] == [10, 20] and rows[20]["lr"] == pytest.approx(0.01)
    after = [s for s in rows if s > 20]
    assert after == [25, 30, 35, 40]  # train.log_every=5
    for step in after:  # lr x the new cosine (floor 0.5) over the new length, at the step it resumed to
        assert rows[step]["lr"] == pytest.approx(0.001 * lr_factor(step, 0, 40, 0.5), rel=1e-9)


def test_the_changed_ema_decay_is_applied(resumed):
    run, _ = resumed
    rows = read_jsonl(run / "metrics.jsonl")
    before = [r["ema_decay"] for r in rows if r["step"] <= 20]
    assert len(before) == 2 and before[0] < before[1] < 0.9999  # the exp ramp, rising
    assert [r["ema_decay"] for r in rows if r["step"] > 20] == [0.5] * 4


def test_the_changed_cadences_are_applied(resumed):
    run, _ = resumed
    validated = sorted({r["step"] for r in read_jsonl(run / "val" / "results.jsonl")})
    assert validated == [10, 20, 25, 30, 35, 40]
    saved = [e["step"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "checkpoint"]
    assert saved == [10, 20, 24, 25, 30, 32, 35, 40]  # every 8 steps, every validation step, the end


def test_the_changed_weight_decay_and_betas_are_what_the_optimizer_ran_with(resumed):
    run, _ = resumed
    from launcher.checkpoint import store

    state = store.load(store.path_for(run / "checkpoints", 40))
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert groups["decay"]["weight_decay"] == 0.2 and groups["bias"]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.8, 0.999) and g["initial_lr"] == 0.001 for g in groups.values())


def test_a_scaler_resumes_from_a_run_saved_without_fp16():
    """train.precision=fp16 on resume: the checkpoint's scaler state is empty (it was off); start afresh."""
    from launcher.precision import GradScaler

    off, on = GradScaler("cpu", enabled=False), GradScaler("cpu", enabled=True, init_scale=8.0)
    on.load_state_dict(off.state_dict())
    assert on.get_scale() == 8.0
    on.load_state_dict({**on.state_dict(), "scale": 2.0})
    assert on.get_scale() == 2.0
    with pytest.raises(RuntimeError):  # torch's own refuses: what a resume into fp16 hit
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(off.state_dict())
