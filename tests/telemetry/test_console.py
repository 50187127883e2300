"""A console a person can read (issue 27, item 6): events go to events.jsonl and the log file, the console
keeps the human lines; a resume says where it continues; the start line says how the processes are laid out;
the rich bar keeps its step count and ETA on an 80-column terminal."""
import io
import re

import pytest

from conftest import read_jsonl

HUMAN = ("train step=", "training ", "resuming ", "done: ", "telemetry: ", "wandb: ")


@pytest.mark.slow
def test_a_resume_says_where_it_continues_and_nothing_else_is_noise(relaunched):
    run, second = relaunched["run"], relaunched["procs"][1]
    lines = [ln for ln in second.stdout.splitlines() if ln.strip()]
    assert f"resuming {run} from step 20 (epoch 0); 20 steps left" in lines
    assert [ln for ln in lines if not ln.startswith(HUMAN)] == [], second.stdout
    # The events are all still recorded, in events.jsonl and in the log file.
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    assert {"handoff", "checkpoint", "resume", "start", "end"} <= set(events)
    log = (run / "logs" / "rank-0.log").read_text()
    assert log.count("event checkpoint") == events.count("checkpoint")


@pytest.mark.slow
def test_two_processes_say_one_training_rank_and_one_validator_rank(reference):
    stdout = (reference[2].parent / "two.stdout").read_text()
    starts = [ln for ln in stdout.splitlines() if ln.startswith("training ")]
    assert len(starts) == 1 and "on 1 training rank + 1 validator rank:" in starts[0], stdout
    assert "event " not in stdout


def test_the_rich_bar_keeps_step_count_and_eta_at_80_columns():
    from rich.console import Console

    from launcher.telemetry.progress import RichProgress

    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    bar = RichProgress(6200, console=console)
    row = {"step": 1250, "epoch": 20, "loss": 0.4321, "lr": 0.01, "samples_per_s": 25000.0}
    bar.update(row, 12.0, {"metric": "ema_acc", "value": 0.9123, "step": 1240})  # a validation has arrived
    bar.bar.refresh()
    bar.close()
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue()).split("\r")[-1].splitlines()[0]
    assert "1250/6200" in last and "eta 0:00:12" in last and "val ema_acc 0.9123" in last, repr(last)
    assert len(last) <= 80
