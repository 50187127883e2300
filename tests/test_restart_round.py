"""torchrun restarts after a worker died before it joined the process group (issue 13, item 7).

The store of each start used to be named by counting starts in torchrun's store
(`(count - 1) // world`): a worker killed before it counted shifted the count, the
restarted ranks computed different rounds and waited for each other until the
process-group timeout. `debug.fail_at_start` SIGKILLs a rank at that very point, on the
first start only; the restarted group must meet at once and train to the end.
"""
from __future__ import annotations

import json
import time

import pytest

from conftest import FAST, launch, read_jsonl


@pytest.mark.slow
@pytest.mark.parametrize("killed", [1, 0], ids=["rank1", "rank0"])
def test_worker_killed_before_joining_then_restarted_group_trains_to_the_end(run_dir, killed):
    # dist.timeout_s bounds a hang (the old failure) to a minute instead of 30; a healthy restart needs seconds.
    t0 = time.perf_counter()
    out = launch(["train", *FAST, "train.epochs=1", "validation.mode=inline", "checkpoint.every_steps=0",
                  f"debug.fail_at_start={killed}", "dist.timeout_s=60", f"run.dir={run_dir}"], nproc=2,
                 torchrun_args=["--max-restarts=1", "--monitor-interval=1"], check=False, timeout=300)
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-6000:]
    assert f"debug.fail_at_start={killed}: killing this process" in out.stderr
    assert "failed (exitcode: -9)" in out.stderr  # torchrun saw the SIGKILL
    events = read_jsonl(run_dir / "events.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["train_world"] == 2  # the first start never got that far
    assert [e["restart_count"] for e in events if e["event"] == "restart"] == [1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == starts[0]["steps"] > 0
    assert seconds < 50, f"the restarted group took {seconds:.0f}s: it waited for a timeout"
