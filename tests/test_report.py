"""`launcher report`: PNGs and report.md for a finished run, a partial run and --compare."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import FAST, launch
from launcher.report import autobatch_points, main as report_main
from launcher.rundir import RunDir

PNG = b"\x89PNG\r\n\x1a\n"


def pngs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.glob("*.png")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "finished"
    launch(["train", *FAST, "train.log_every=5", "validation.every_steps=20", "validation.weights=both",
            f"run.dir={run_dir}"])
    return run_dir


@pytest.mark.slow
def test_report_of_a_finished_run(finished):
    proc = launch(["report", str(finished)])
    out = finished / "report"
    images = pngs(out)
    assert set(images) == {"loss_lr.png", "validation.png", "throughput.png", "stalls.png"}
    assert all(data.startswith(PNG) and len(data) > 5000 for data in images.values())
    md = (out / "report.md").read_text()
    for name in images:
        assert f"]({name})" in md
    summary = json.loads((finished / "summary.json").read_text())
    assert f"| best_step | {summary['best_step']} |" in md and "| status | finished |" in md
    stall = summary["stall_by_cause"]  # where the training thread's time went: a sentence and one chart
    assert {"checkpoint", "handoff", "agreement", "logging"} <= set(stall["causes"]) and stall["wall_s"] > 0
    assert f"The training thread was blocked {stall['stalled_s']:.2f} s of {stall['wall_s']:.2f} s" in md
    assert "Done off the training thread: checkpoint" in md and "stall_by_cause" not in md
    assert "_no data in this run_" in md  # GPU and autobatch: not on this CPU run
    assert f"report: {out / 'report.md'}" in proc.stdout


def test_report_of_a_partial_run_in_progress(finished, tmp_path):
    """No summary, no validation yet, a writer mid-line in metrics.jsonl: plots what is there, notes the rest."""
    partial = tmp_path / "partial"
    shutil.copytree(finished, partial, ignore=shutil.ignore_patterns("report", "checkpoints"))
    (partial / "summary.json").unlink()
    shutil.rmtree(partial / "val")
    shutil.rmtree(partial / "best")
    lines = (partial / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:4]) + '\n{"step": 25, "epo')
    assert report_main([str(partial)]) == 0
    images = pngs(partial / "report")
    assert set(images) == {"loss_lr.png", "throughput.png"}
    assert all(data.startswith(PNG) for data in images.values())
    md = (partial / "report" / "report.md").read_text()
    assert "in progress" in md and "| last logged step | 20 |" in md
    assert "`val/results.jsonl` not found: no validation plot" in md
    assert "`summary.json` not found: the run is in progress or was stopped" in md


@pytest.mark.slow
def test_report_compare_overlays_two_runs(finished, tmp_path):
    other = tmp_path / "other"
    launch(["train", *FAST, "train.max_steps=30", "optim.lr=0.01", "train.log_every=5", f"run.dir={other}"])
    out = tmp_path / "cmp"
    assert report_main(["--compare", str(finished), str(other), "--out", str(out)]) == 0
    images = pngs(out)
    assert {"loss_lr.png", "validation.png", "throughput.png"} <= set(images)
    md = (out / "report.md").read_text()
    assert "## finished" in md and "## other" in md and "vs" in md.splitlines()[0]
    other_best = json.loads((other / "best" / "best.json").read_text())
    assert f"| best_step | {other_best['step']} |" in md  # both summaries, side by side
    assert all(len(images[n]) > 5000 for n in images)


def test_report_gpu_and_autobatch_plots(finished, tmp_path):
    """GPU rows as telemetry writes them on a GPU machine, and the autobatch.json of a real probed run."""
    run = tmp_path / "gpu"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("report", "checkpoints"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["gpu"] = [{"index": g, "uuid": f"GPU-{g}abc", "util": 50.0 + i + g, "mem_used_gb": 10.0 + g,
                     "mem_total_gb": 80.0, "power_w": 300.0, "temp_c": 60.0} for g in (0, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    probed = tmp_path / "probed"  # the probe on a simulated 100-sample device
    launch(["train", *FAST, "batch.size=auto", "debug.simulate_oom_above=100", "train.max_steps=2",
            "validation.mode=off", f"run.dir={probed}"])
    shutil.copy(probed / "autobatch.json", run / "autobatch.json")
    record = RunDir(run).read_autobatch()
    points = autobatch_points(record)[0]
    assert [b for b, _, _ in points] == [p["size"] for p in record.per_rank[0]["probes"]] and len(points) >= 3
    assert any(not fits for _, _, fits in points) and max(b for b, _, fits in points if fits) <= 100
    assert record.micro_batch <= 100 and record.reason == "probed"
    assert report_main([str(run)]) == 0
    images = pngs(run / "report")
    assert {"gpu.png", "autobatch.png"} <= set(images)
    assert all(images[n].startswith(PNG) and len(images[n]) > 5000 for n in ("gpu.png", "autobatch.png"))


def test_report_bad_input_is_one_line(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope")]) == 2
    assert report_main([]) == 2
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("launcher: error:") for line in err)


def test_config_reference_matches_the_schema():
    """docs/config.md is what scripts/config_reference.py generates, and it lists every schema key."""
    import subprocess
    import sys

    from conftest import ROOT
    from launcher.config.schema import flat_defaults

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = (ROOT / "docs" / "config.md").read_text()
    for key, _, default in flat_defaults():
        if key != "job":
            line = next(ln for ln in doc.splitlines() if ln.startswith(f"| `{key}` |"))
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
            assert f"`{shown}`" in line or "[" in shown, (key, line)


# ----------------------------------------------------------------------------- issue 15, item 16
def said(png: Path) -> dict:
    """What a plot says: its titles and legend entries ([label, colour]), from the PNG's text."""
    from PIL import Image

    return json.loads(Image.open(png).info["Description"])


@pytest.fixture(scope="module")
def revalidated(finished, tmp_path_factory) -> Path:
    """A copy of the finished run, re-validated from its checkpoints by `launcher validate <dir>`."""
    run = tmp_path_factory.mktemp("revalidated") / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("report"))
    launch(["validate", str(run), "validation.device=cpu"], timeout=240)
    return run


def test_report_and_validate_take_the_run_directory_in_both_forms(finished, revalidated):
    rows = [json.loads(x) for x in (revalidated / "val" / "results.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r.get("source") == "checkpoint"]) > 0  # validate <dir> re-validated the run
    assert report_main([f"run.dir={revalidated}"]) == 0 and (revalidated / "report" / "report.md").exists()


def test_a_step_has_one_epoch_in_every_row(revalidated):
    """Issue 27, item 3: a re-validation row from a checkpoint names the step's epoch, as the live row does (the
    checkpoint after an epoch's last step holds the next epoch's start)."""
    rows = [json.loads(x) for x in (revalidated / "val" / "results.jsonl").read_text().splitlines()]
    epochs = {}
    for r in rows:
        epochs.setdefault(r["step"], set()).add(r["epoch"])
    assert {r["step"] for r in rows if r.get("source")} & {62, 124}  # epoch ends are among the checkpoints
    assert all(len(e) == 1 for e in epochs.values()), epochs
    metrics = {m["step"]: m["epoch"] for m in map(json.loads, (revalidated / "metrics.jsonl").read_text().splitlines())}
    assert all(epochs[s] == {metrics[s]} for s in epochs if s in metrics)


def test_the_report_counts_steps_and_shows_re_validations_apart(revalidated):
    assert report_main([str(revalidated)]) == 0
    md = (revalidated / "report" / "report.md").read_text()
    rows = [json.loads(x) for x in (revalidated / "val" / "results.jsonl").read_text().splitlines()]
    live = {r["step"] for r in rows if not r.get("source")}
    again = {r["step"] for r in rows if r.get("source")}
    assert f"| validated steps | {len(live)} (ema and raw weights) |" in md
    assert f"| re-validated steps (checkpoints, marked x) | {len(again)} (ema and raw weights) |" in md
    val = said(revalidated / "report" / "validation.png")
    assert "x: re-validated from checkpoints" in val["titles"][0]
    assert {"ema re-validated", "raw re-validated"} <= {label for label, _ in val["legend"]}


def test_report_titles_and_legends_say_only_what_is_plotted(finished, tmp_path):
    run = tmp_path / "ema_only"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("report", "checkpoints"))
    rows = [json.loads(x) for x in (run / "val" / "results.jsonl").read_text().splitlines()]
    (run / "val" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["weights"] == "ema"))
    assert report_main([str(run)]) == 0
    loss, val, speed = (said(run / "report" / n) for n in ("loss_lr.png", "validation.png", "throughput.png"))
    assert "resume" not in " ".join(loss["titles"]) and "dashed" not in " ".join(val["titles"])
    assert "ema" in val["titles"][0] and "raw" not in val["titles"][0]
    assert speed["titles"] == ["training throughput"] and any("mean of" in lb for lb, _ in speed["legend"])
    with open(run / "events.jsonl", "a") as f:  # a resume: now the dotted line is there and named
        f.write(json.dumps({"event": "resume", "step": 20, "time": 0}) + "\n")
    assert report_main([str(run)]) == 0
    assert "dotted: resume" in said(run / "report" / "loss_lr.png")["titles"][0]


def test_report_in_progress_shows_the_planned_steps(finished, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(finished, partial, ignore=shutil.ignore_patterns("report", "checkpoints"))
    (partial / "summary.json").unlink()
    lines = (partial / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    planned = next(e["steps"] for e in map(json.loads, (partial / "events.jsonl").read_text().splitlines())
                   if e["event"] == "start")
    assert report_main([str(partial)]) == 0
    assert f"of {planned}" in said(partial / "report" / "loss_lr.png")["titles"][0]
    assert f"| planned steps | {planned} |" in (partial / "report" / "report.md").read_text()


def test_report_compare_marks_each_best_in_its_runs_colour(finished, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(finished, other, ignore=shutil.ignore_patterns("report", "checkpoints"))
    best = json.loads((other / "best" / "best.json").read_text())
    (other / "best" / "best.json").write_text(json.dumps({**best, "value": best["value"] - 0.1}))
    assert report_main(["--compare", str(finished), str(other), "--out", str(tmp_path / "cmp")]) == 0
    legend = said(tmp_path / "cmp" / "validation.png")["legend"]
    bests = {lb.split("(")[-1].rstrip(")"): c for lb, c in legend if lb.startswith("best")}
    assert set(bests) == {"finished", "other"} and len(set(bests.values())) == 2
    for name, colour in bests.items():
        assert {c for lb, c in legend if lb.startswith(f"{name} ")} == {colour}  # its ema and raw lines


def test_the_report_says_what_it_draws_and_what_is_missing(finished, tmp_path, capsys):
    """Issue 27, item 8: no LR panel for a constant LR (the title says it), the smoothing's window named, every
    event counted (checkpoints too), and a missing file noted with what it leaves out, not 'plots skipped'."""
    run = tmp_path / "stopped"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("report", "checkpoints"))
    (run / "summary.json").unlink()
    assert report_main([str(run)]) == 0
    loss, speed = said(run / "report" / "loss_lr.png"), said(run / "report" / "throughput.png")
    assert loss["titles"] == ["loss (learning rate constant at 0.01; dash-dot: planned end, step 124 of 124)"]
    assert any(label.endswith("(mean of the last 2 log lines)") for label, _ in speed["legend"]), speed
    md = (run / "report" / "report.md").read_text()
    events = next(line for line in md.splitlines() if line.startswith("| events |"))
    saved = sum(json.loads(x)["event"] == "checkpoint" for x in (run / "events.jsonl").read_text().splitlines())
    assert f"checkpoint x{saved}" in events and "start x1" in events
    out = capsys.readouterr().out
    assert "summary.json not found: the run is in progress or was stopped" in out and "skipped" not in out
