"""Leaving after a fault on 2+ processes: no teardown waits for a collective a peer never joins, so
torchrun's restart (or the job's end) follows at once instead of after dist.timeout_s. Real torchrun."""
import time

import pytest

from conftest import FAST, launch, read_jsonl


@pytest.mark.slow
def test_a_rank_failing_with_a_collective_in_flight_leaves_at_once(run_dir):
    """Rank 1 fails in a forward with an all-reduce of its own in flight (tests/support/stuck_job.py). Tearing its
    process group down would wait for that collective until dist.timeout_s (90 s here; measured before this
    change: the run took the timeout + 14 s); it leaves at once, its traceback printed, and rank 0 follows."""
    t0 = time.monotonic()
    proc = launch(["train", *[a for a in FAST if not a.startswith("job.")], "job=custom",
                   "job.target=tests.support.stuck_job:StuckJob", "+job.params.fail_at_forward=3", "validation.mode=off",
                   "train.max_steps=6", "dist.timeout_s=90", f"run.dir={run_dir}"], nproc=2, check=False, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and elapsed < 60, (elapsed, proc.stderr[-3000:])
    assert proc.stderr.count("RuntimeError: injected failure with a collective in flight") == 1, proc.stderr[-3000:]
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")][-1] == "start"  # no end: it failed
