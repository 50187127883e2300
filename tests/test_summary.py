"""summary.json describes the whole run across launches; a launch with nothing to do says so and changes
nothing (issue 27, item 2). One run over three launches (conftest `relaunched`)."""
import json

import pytest

from conftest import read_jsonl


@pytest.mark.slow
def test_the_summary_covers_every_launch(relaunched):
    run = relaunched["run"]
    first, summary = json.loads(relaunched["first_summary"]), json.loads((run / "summary.json").read_text())
    assert first["steps"] == 20 and first["launches"] == 1
    assert summary["steps"] == 40 and summary["launches"] == 2
    validated = {r["step"] for r in read_jsonl(run / "val" / "results.jsonl")}
    assert validated == {10, 20, 30, 40}
    assert summary["validated_steps"] == 4 and summary["unvalidated_steps"] == [] and summary["stale_steps"] == []
    handoffs = [e["blocked_ms"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "handoff"]
    assert len(handoffs) == 4 and summary["handoff_blocked_ms"]["max"] == max(handoffs)
    # Wall time: the first launch's (carried by its checkpoints) plus the second's.
    assert summary["wall_time_s"] > first["wall_time_s"] > 0


@pytest.mark.slow
def test_a_finished_run_relaunched_says_so_and_changes_nothing(relaunched):
    run, third = relaunched["run"], relaunched["procs"][2]
    assert third.returncode == 0
    lines = [ln for ln in (third.stdout + third.stderr).splitlines() if ln.strip()]
    assert lines == [f"launcher: {run} is already finished at step 40 (summary.json); nothing to do "
                     "(raise train.epochs or train.max_steps to train on)"], lines
    assert relaunched["after"] == relaunched["before"]  # every file: same size, same mtime (summary.json too)


@pytest.mark.slow
def test_a_finished_run_asked_for_more_steps_trains_on(relaunched):
    """The second launch raised train.max_steps on the finished first one: it resumed, not 'nothing to do'."""
    second = relaunched["procs"][1]
    assert "nothing to do" not in second.stderr
    assert [e["step"] for e in read_jsonl(relaunched["run"] / "events.jsonl") if e["event"] == "resume"] == [20]
