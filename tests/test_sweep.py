"""Sweeps, Hydra's way (issue 15 item 5): `launcher train -m key=a,b` runs each point in its own run
directory under one sweep directory and sums the sweep up; a failed point makes the exit status non-zero."""
import json

import pytest

from conftest import FAST, launch, read_jsonl

SHORT = [*FAST, "train.max_steps=12", "validation.every_steps=6"]


def _sweep(path):
    return json.loads((path / "sweep.json").read_text())


@pytest.mark.slow
def test_multirun_runs_each_point_in_its_own_dir_and_sums_up(tmp_path):
    sweep = tmp_path / "sweep"
    # Point 0 is killed hard at step 5 (a crash); point 1 trains to the end.
    proc = launch(["train", "-m", "debug.fail_at_step=5,null", "optim.lr=0.01", *SHORT, "validation.mode=inline",
                   f"run.dir={sweep}"], check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    data = _sweep(sweep)
    assert [p["params"] for p in data["points"]] == [["debug.fail_at_step=5"], ["debug.fail_at_step=null"]]
    assert [p["status"] for p in data["points"]] == ["failed", "completed"]
    assert data["failed"] == 1 and data["best"]["n"] == 1
    one = data["points"][1]
    assert one["steps"] == 12 and one["best_metric"] == "acc" and one["run_dir"] == str(sweep / "1")
    # Each point is a whole run with its own overrides, in <sweep dir>/<n>.
    for n in (0, 1):
        assert "lr: 0.01" in (sweep / str(n) / "config.yaml").read_text()
    assert (sweep / "1" / "summary.json").exists() and not (sweep / "0" / "summary.json").exists()
    table = (sweep / "sweep.md").read_text()
    assert "| 1 | debug.fail_at_step=null | completed | 12 |" in table and "failed: 1 of 2" in table
    # `launcher sweep <dir>` prints the summary again; its status says a point failed.
    again = launch(["sweep", str(sweep)], check=False, timeout=120)
    assert again.returncode == 1 and "best: point 1" in again.stdout


@pytest.mark.slow
def test_multirun_under_torchrun_every_rank_runs_the_same_points(tmp_path):
    sweep = tmp_path / "sweep"
    proc = launch(["train", "--multirun", "optim.lr=0.001,0.01", *SHORT, f"run.dir={sweep}"], nproc=2,
                  timeout=400)
    data = _sweep(sweep)
    assert [p["status"] for p in data["points"]] == ["completed", "completed"], proc.stderr[-3000:]
    for n, lr in enumerate(("0.001", "0.01")):
        run = sweep / str(n)
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
        [start] = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "start"]
        assert start["world"] == 2 and start["train_world"] == 1  # the validator rank, as in a plain run
        assert read_jsonl(run / "val" / "results.jsonl")


@pytest.mark.slow
def test_sweep_of_nothing_to_sweep_is_one_point(tmp_path):
    launch(["train", "-m", *SHORT, "validation.mode=off", f"run.dir={tmp_path}/s"], timeout=200)
    assert [p["status"] for p in _sweep(tmp_path / "s")["points"]] == ["completed"]
