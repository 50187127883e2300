"""Training quality: the mnist1d recipe comes with the job only, the EMA's tau scales with the run,
and validation.weights=both reports the best raw and the best EMA side by side."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import FAST, launch, read_jsonl
from launcher.ema import auto_tau, decay_at


@pytest.mark.parametrize("total", [100, 3720, 6200, 100_000])
def test_auto_tau_makes_the_final_average_span_five_percent_of_the_run(total):
    tau = auto_tau(total)
    span = 1.0 / (1.0 - decay_at(total, 1.0, "exp", tau))  # without the decay cap
    assert span == pytest.approx(0.05 * total, rel=1e-6)
    assert auto_tau(total) == tau  # pure


def test_auto_tau_stays_valid_on_tiny_runs_and_the_cap_rules_long_ones():
    assert auto_tau(0) >= 1.0 and auto_tau(1) >= 1.0 and auto_tau(20) >= 1.0
    long_run = 10_000_000
    capped = 1.0 / (1.0 - decay_at(long_run, 0.9999, "exp", auto_tau(long_run)))
    assert 9_000 < capped < 10_000  # ema.decay=0.9999 limits the span to ~10k steps


def composed(*overrides: str) -> dict:
    proc = launch(["train", *overrides, "--cfg", "job"])
    return yaml.safe_load(proc.stdout)


@pytest.mark.slow
def test_the_mnist1d_recipe_comes_with_the_job_only():
    default = composed()
    assert default["optim"]["lr"] == 1e-2 and default["optim"]["weight_decay"] == 0.05
    assert default["sched"]["min_lr"] == 1.0 and default["train"]["epochs"] == 100
    assert default["ema"]["tau"] is None  # auto
    synthetic = composed("job=synthetic")
    assert synthetic["optim"]["lr"] == 3e-3 and synthetic["sched"]["min_lr"] == 0.0
    assert synthetic["train"]["epochs"] == 60
    sgd = composed("optim=sgd")  # an optimizer chosen on the command line replaces the recipe's
    assert sgd["optim"]["name"] == "sgd" and sgd["optim"]["lr"] == 0.1 and sgd["sched"]["min_lr"] == 0.0
    assert sgd["job"]["name"] == "mnist1d" and sgd["train"]["epochs"] == 100


@pytest.mark.slow
def test_weights_both_reports_best_raw_and_best_ema_and_auto_tau(run_dir):
    launch(["train", *FAST, "validation.weights=both", "validation.every_steps=31", f"run.dir={run_dir}"])
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["steps"] == 124
    assert s["ema_tau"] == pytest.approx(auto_tau(124))
    for kind in ("raw", "ema"):
        assert 0.2 < s[f"best_{kind}"]["value"] <= 1.0 and s[f"best_{kind}"]["step"] in (31, 62, 93, 124)
        assert 0.2 < s[f"final_{kind}"] <= 1.0
    assert s["best_value"] == s["best_ema"]["value"] and s["best_step"] == s["best_ema"]["step"]
    rows = read_jsonl(run_dir / "val" / "results.jsonl")
    for kind in ("raw", "ema"):
        accs = {r["step"]: r["metrics"]["acc"] for r in rows if r["weights"] == kind}
        assert s[f"best_{kind}"]["value"] == max(accs.values()) == accs[s[f"best_{kind}"]["step"]]
        assert s[f"final_{kind}"] == accs[124]
    assert math.isclose(s["ema_decay"], decay_at(124, 0.9999, "exp", auto_tau(124)))
