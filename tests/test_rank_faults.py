"""Faults on one rank that must not reach the others (issue 13), with real torchrun processes:
a NaN loss on a training rank other than 0, an out-of-memory error inside rank 0's hand-off,
and a validator child killed under the validator rank."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, child_env, command, launch, read_jsonl
from launcher import handoff

QUICK = [*FAST, "checkpoint.every_steps=0", "train.log_every=1"]


def test_nan_loss_on_rank_1_of_2_is_skipped_by_the_ema_on_rank_0(run_dir):
    """Rank 1's NaN reaches rank 0 only through the averaged gradients: rank 0's own loss is finite. The
    EMA gate looks at the synced gradients' norm, so the EMA skips that step and stays finite."""
    launch(["train", *QUICK, "validation.mode=off", "train.max_steps=4", "debug.nan_loss_at_step=4",
            "debug.nan_loss_rank=1", f"run.dir={run_dir}"], nproc=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ema_skipped"] == 1 and summary["ema_updates"] == 3
    ema = load_file(str(run_dir / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in ema.values() if v.is_floating_point())
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["ema_skipped"] == 1
    assert "a NaN loss on this rank" in (run_dir / "logs" / "rank-1.log").read_text()


def test_out_of_memory_inside_the_hand_off_skips_that_snapshot_and_training_goes_on(run_dir):
    """A real torch.OutOfMemoryError inside handoff.Writer.put (debug.handoff_oom_at_step): rank 0 does not
    crash, the snapshot is recorded as skipped (reason oom) with an event, and later snapshots are handed off."""
    launch(["train", *QUICK, "validation.mode=external", "validation.policy=all", "validation.every_steps=2",
            "validation.drain_timeout_s=0", "train.max_steps=6", "debug.handoff_oom_at_step=4",
            f"run.dir={run_dir}"])
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    assert [(r["step"], r["reason"]) for r in read_jsonl(run_dir / "val" / "skipped.jsonl")] == [(4, "oom")]
    events = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "validation_skipped"]
    assert [(e["step"], e["reason"]) for e in events] == [(4, "oom")]
    assert handoff.pending(run_dir / "handoff") == [2, 6]
