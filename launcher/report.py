"""`python -m launcher report <run_dir>`: PNG plots and report.md from a run directory alone.

Reads only files of the run directory (metrics.jsonl, val/results.jsonl,
best/best.json, summary.json, events.jsonl, autobatch.json), so it works on a
finished run, a run still in progress (possibly from another machine) and a
partial run: a missing file is noted with what it leaves out. `--compare A B`
overlays two runs. The plots: launcher/plots.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from launcher.files import iter_jsonl, read_json
from launcher.plots import autobatch_points, plot_autobatch, plot_gpu, plot_loss, plot_stalls, plot_throughput, plot_val
from launcher.rundir import RunDir
from launcher.telemetry import stalls

__all__ = ["Run", "autobatch_points", "main", "summary_rows", "write_report"]

USAGE = "python -m launcher report <run_dir> [--out DIR] | report --compare <run_a> <run_b> [--out DIR]"


class Run:
    """Everything the report needs from one run directory; absent files are empty and noted with what they
    leave out. `val` holds the validations of the run; `revalidated` the rows `launcher validate` added later
    from a finished run's checkpoints (`source: checkpoint`), shown apart."""

    def __init__(self, path: Path):
        self.path, rundir = path, RunDir(path)
        self.name = path.name if path.name not in ("", ".") else str(path)
        self.notes: List[str] = []
        self.metrics = self._jsonl(rundir.metrics, "no loss, learning rate or throughput plots")
        self.train = [r for r in self.metrics if "loss" in r]
        rows = self._jsonl(rundir.results, "no validation plot")
        self.val, self.revalidated = [r for r in rows if not r.get("source")], [r for r in rows if r.get("source")]
        self.events = self._jsonl(rundir.events, "no resumes marked, no event counts")
        self.best = self._json(rundir.best_json, "no best marked")
        self.summary = self._json(rundir.summary, "the run is in progress or was stopped")
        self.autobatch = rundir.read_autobatch()

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()

    def _jsonl(self, path: Path, without: str) -> List[dict]:
        if not path.exists():
            self.notes.append(f"`{self._rel(path)}` not found: {without}")
            return []
        return list(iter_jsonl(path))

    def _json(self, path: Path, without: str) -> Optional[dict]:
        try:
            return read_json(path)
        except FileNotFoundError:
            self.notes.append(f"`{self._rel(path)}` not found: {without}")
        except ValueError as e:
            self.notes.append(f"`{self._rel(path)}` unreadable ({e}): {without}")
        return None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def planned_steps(self) -> Optional[int]:
        """The total the latest session set out to train (its `start` event)."""
        return next((e.get("steps") for e in reversed(self.events) if e.get("event") == "start"), None)

    def val_series(self, revalidated: bool = False) -> Dict[Tuple[str, str], Tuple[List[int], List[float]]]:
        """(weights, metric) -> (steps, values), sorted by step: of the run's validations, or of the re-validations."""
        out: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
        for r in self.revalidated if revalidated else self.val:
            for k, v in r.get("metrics", {}).items():
                out.setdefault((r.get("weights", "?"), k), []).append((r["step"], v))
        return {key: ([s for s, _ in sorted(pts)], [v for _, v in sorted(pts)]) for key, pts in out.items()}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_rows(run: Run) -> List[Tuple[str, str]]:
    rows = [("status", "finished" if run.finished else "in progress or stopped (no summary.json)")]
    if run.summary:
        rows += [(k, _fmt(v)) for k, v in run.summary.items() if k != "stall_by_cause"]  # its own section
    elif run.train:
        last = run.train[-1]
        rows += [("last logged step", str(last["step"])), ("last loss", _fmt(last["loss"]))]
        rows += [("planned steps", str(run.planned_steps))] if run.planned_steps else []
    if run.best and not (run.summary and "best_step" in run.summary):
        rows += [("best", f"{run.best.get('metric')} {_fmt(run.best.get('value'))} at step {run.best.get('step')}")]
    counts: Dict[str, int] = {}
    for e in run.events:
        counts[e.get("event", "?")] = counts.get(e.get("event", "?"), 0) + 1
    if counts:
        rows.append(("events", ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))))
    for label, rows_of in (("validated steps", run.val), ("re-validated steps (checkpoints, marked x)", run.revalidated)):
        if rows_of:  # steps, not rows: `both` validates two sets of weights per step
            weights = sorted({r.get("weights", "?") for r in rows_of})
            rows.append((label, f"{len({r['step'] for r in rows_of})} ({' and '.join(weights)} weights)"))
    return rows


def write_report(runs: List[Run], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    title = runs[0].name if len(runs) == 1 else " vs ".join(r.name for r in runs)
    lines = [f"# Run report: {title}", ""]
    for i, run in enumerate(runs):
        lines += [f"## {run.name}" if len(runs) > 1 else "## Summary", "", f"`{run.path}`", "",
                  "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary_rows(run)]
        lines.append("")
        if run.notes:
            lines += ["Missing: " + "; ".join(run.notes) + ".", ""]
        stall = (run.summary or {}).get("stall_by_cause")
        if stall:  # where the training thread's time went, and what the background took off it
            name = plot_stalls(stall, out / (f"stalls-{i}.png" if len(runs) > 1 else "stalls.png"))
            lines += ["### Where the time went", "", stalls.describe(stall), "", f"![stalls]({name})", ""]
    plots = [("Loss and learning rate", plot_loss(runs, out)), ("Validation", plot_val(runs, out)),
             ("Throughput", plot_throughput(runs, out))]
    if len(runs) == 1:
        plots += [("GPU utilization and memory", plot_gpu(runs[0], out)),
                  ("Autobatch probe", plot_autobatch(runs[0], out))]
    lines.append("## Plots")
    lines.append("")
    for heading, name in plots:
        if name:
            lines += [f"### {heading}", "", f"![{heading}]({name})", ""]
        else:
            lines += [f"### {heading}", "", "_no data in this run_", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher report", usage=USAGE,
                                description="Plots and a summary of a run directory (reads nothing else).")
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("RUN_A", "RUN_B"), help="overlay two runs")
    p.add_argument("--out", type=Path, help="output folder (default: <run_dir>/report, or <run_a>/compare-<b>)")
    args = p.parse_args([a.split("=", 1)[1] if a.startswith("run.dir=") else a for a in argv])
    dirs = list(args.compare) if args.compare else [args.run_dir] if args.run_dir else []
    if not dirs or (args.compare and args.run_dir):
        print(f"launcher: error: give one run directory or --compare A B; usage: {USAGE}", file=sys.stderr)
        return 2
    for d in dirs:
        if not d.is_dir():
            print(f"launcher: error: run directory {d} does not exist", file=sys.stderr)
            return 2
    runs = [Run(d.resolve()) for d in dirs]
    if len(runs) == 2 and runs[0].name == runs[1].name:
        for r in runs:
            r.name = f"{r.path.parent.name}/{r.name}"
    if not any(r.metrics or r.val or r.revalidated for r in runs):
        print(f"launcher: error: {', '.join(map(str, dirs))}: no metrics.jsonl or val/results.jsonl; "
              "is this a run directory?", file=sys.stderr)
        return 2
    report = RunDir(dirs[0]).report
    out = args.out or (report if len(dirs) == 1 else report / f"compare-{dirs[1].name}")
    path = write_report(runs, out)
    for r in runs:
        for note in r.notes:
            print(f"report: {r.name}: {note.replace('`', '')}")
    print(f"report: {path}")
    return 0
