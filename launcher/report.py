"""`python -m launcher report <run_dir>`: PNG plots and report.md from a run directory alone.

Reads only files of the run directory (metrics.jsonl, val/results.jsonl,
best/best.json, summary.json, events.jsonl, autobatch.json), so it works on a
finished run, a run still in progress (possibly from another machine) and a
partial run: a missing file skips its plot with a note. `--compare A B` overlays
two runs. matplotlib runs on the Agg backend: no display needed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from launcher.files import iter_jsonl, read_json
from launcher.rundir import AutobatchRecord, RunDir
from launcher.telemetry import stalls

USAGE = "python -m launcher report <run_dir> [--out DIR] | report --compare <run_a> <run_b> [--out DIR]"


class Run:
    """Everything the report needs from one run directory; absent files are empty and noted."""

    def __init__(self, path: Path):
        self.path, rundir = path, RunDir(path)
        self.name = path.name if path.name not in ("", ".") else str(path)
        self.notes: List[str] = []
        self.metrics = self._jsonl(rundir.metrics)
        self.train = [r for r in self.metrics if "loss" in r]
        self.val = self._jsonl(rundir.results)
        self.events = self._jsonl(rundir.events)
        self.best = self._json(rundir.best_json)
        self.summary = self._json(rundir.summary)
        self.autobatch = rundir.read_autobatch()

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.path).as_posix()

    def _jsonl(self, path: Path) -> List[dict]:
        if not path.exists():
            self.notes.append(f"`{self._rel(path)}` not found")
            return []
        return list(iter_jsonl(path))

    def _json(self, path: Path) -> Optional[dict]:
        try:
            return read_json(path)
        except FileNotFoundError:
            self.notes.append(f"`{self._rel(path)}` not found")
        except ValueError as e:
            self.notes.append(f"`{self._rel(path)}` unreadable ({e})")
        return None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def planned_steps(self) -> Optional[int]:
        """The total the latest session set out to train (its `start` event)."""
        return next((e.get("steps") for e in reversed(self.events) if e.get("event") == "start"), None)

    def val_series(self) -> Dict[Tuple[str, str], Tuple[List[int], List[float]]]:
        """(weights, metric) -> (steps, values), sorted by step."""
        out: Dict[Tuple[str, str], List[Tuple[int, float]]] = {}
        for r in self.val:
            for k, v in r.get("metrics", {}).items():
                out.setdefault((r.get("weights", "?"), k), []).append((r["step"], v))
        return {key: ([s for s, _ in sorted(pts)], [v for _, v in sorted(pts)]) for key, pts in out.items()}

    def primary_metric(self) -> Optional[str]:
        if self.best:
            return self.best.get("metric")
        keys = sorted({k for r in self.val for k in r.get("metrics", {})})
        return keys[0] if keys else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend(ax) -> List[List[str]]:
    from matplotlib.colors import to_hex

    legend = ax.get_legend()
    handles = legend.legend_handles if legend else []
    return [[t.get_text(), to_hex(h.get_markerfacecolor() if h.get_marker() == "*" else h.get_color())]
            for t, h in zip(legend.get_texts(), handles)] if legend else []


def _save(fig, path: Path) -> str:
    """The PNG, with its titles and legend entries ([label, colour]) as JSON in its Description text."""
    import json

    fig.tight_layout()
    said = {"titles": [ax.get_title() for ax in fig.axes if ax.get_title()],
            "legend": [e for ax in fig.axes for e in _legend(ax)]}
    fig.savefig(path, dpi=110, metadata={"Description": json.dumps(said)})
    _plt().close(fig)
    return path.name


def _mark_resumes(ax, run: Run) -> bool:
    resumes = [e.get("step", 0) for e in run.events if e.get("event") == "resume"]
    for step in resumes:
        ax.axvline(step, color="grey", ls=":", lw=1)
    return bool(resumes)


def plot_loss(runs: List[Run], out: Path) -> Optional[str]:
    runs = [r for r in runs if r.train]
    if not runs:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    resumed, planned = False, []
    for run in runs:
        steps = [r["step"] for r in run.train]
        line, = ax1.plot(steps, [r["loss"] for r in run.train], label=run.name)
        ax2.plot(steps, [r.get("lr", float("nan")) for r in run.train], label=run.name)
        resumed |= _mark_resumes(ax1, run)
        if not run.finished and run.planned_steps:  # in progress: where it is heading
            ax1.axvline(run.planned_steps, color=line.get_color(), ls="-.", lw=1)
            ax1.set_xlim(left=0, right=run.planned_steps * 1.02)
            planned.append(f"step {steps[-1]} of {run.planned_steps}")
    ax1.set_ylabel("train loss")
    losses = [r["loss"] for run in runs for r in run.train if r["loss"] > 0]
    if losses and max(losses) / min(losses) > 20:
        ax1.set_yscale("log")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("optimizer step")
    ax1.legend()
    notes = (["dotted: resume"] if resumed else []) + ([f"dash-dot: planned end, {', '.join(planned)}"]
                                                        if planned else [])
    ax1.set_title("loss and learning rate" + (f" ({'; '.join(notes)})" if notes else ""))
    return _save(fig, out / "loss_lr.png")


def plot_val(runs: List[Run], out: Path) -> Optional[str]:
    runs = [r for r in runs if r.val]
    if not runs:
        return None
    plt = _plt()
    metrics = sorted({m for run in runs for (_, m) in run.val_series()})
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 3 * len(metrics)), sharex=True, squeeze=False)
    plotted = {w for run in runs for (w, _) in run.val_series()}
    for ax, metric in zip(axes[:, 0], metrics):
        for i, run in enumerate(runs):
            colour = f"C{i}" if len(runs) > 1 else "gold"  # compare: one colour per run, its best too
            for (weights, m), (steps, values) in sorted(run.val_series().items()):
                if m == metric:
                    label = f"{weights}" if len(runs) == 1 else f"{run.name} {weights}"
                    ax.plot(steps, values, marker="o", ms=3, ls="--" if weights == "raw" else "-", label=label,
                            **({"color": colour} if len(runs) > 1 else {}))
            b = run.best
            if b and b.get("metric") == metric:
                ax.plot([b["step"]], [b["value"]], marker="*", ms=16, color=colour, mec="black", zorder=5, ls="",
                        label=f"best {b['value']:.4g} @ {b['step']}" + ("" if len(runs) == 1 else f" ({run.name})"))
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    axes[0, 0].set_title("validation: raw (dashed) vs EMA (solid)" if plotted >= {"raw", "ema"}
                         else f"validation of the {' and '.join(sorted(plotted))} weights")
    return _save(fig, out / "validation.png")


def plot_throughput(runs: List[Run], out: Path) -> Optional[str]:
    runs = [r for r in runs if any("samples_per_s" in x for x in r.train)]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, run in enumerate(runs):
        rows = [r for r in run.train if "samples_per_s" in r]
        steps, values = [r["step"] for r in rows], [r["samples_per_s"] for r in rows]
        k = max(1, len(values) // 10)  # a moving average over a tenth of the points
        windows = [values[max(0, j - k + 1):j + 1] for j in range(len(values))]
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, values, color=f"C{i}", alpha=0.3, lw=1, label=f"{run.name} (each log line)")
        ax.plot(steps, smooth, color=f"C{i}", lw=2, label=f"{run.name} (mean of {k})")
    ax.set_title("training throughput")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("samples/s (all ranks)")
    ax.set_ylim(bottom=0)
    ax.legend()
    return _save(fig, out / "throughput.png")


def plot_gpu(run: Run, out: Path) -> Optional[str]:
    rows = [r for r in run.metrics if r.get("gpu")]
    if not rows:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    gpus = sorted({(g["index"], g.get("uuid", "")) for r in rows for g in r["gpu"]})
    for index, uuid in gpus:
        pts = [(r["step"], g) for r in rows for g in r["gpu"] if g["index"] == index]
        label = f"cuda:{index} {uuid[:12]}"
        ax1.plot([s for s, _ in pts], [g["util"] for _, g in pts], label=label)
        ax2.plot([s for s, _ in pts], [g["mem_used_gb"] for _, g in pts], label=label)
        ax2.axhline(pts[-1][1]["mem_total_gb"], ls=":", lw=1, color=ax2.lines[-1].get_color())
    ax1.set_ylabel("GPU utilization %")
    ax1.set_ylim(0, 105)
    ax2.set_ylabel("memory used GiB (dotted: total)")
    ax2.set_xlabel("optimizer step")
    ax1.legend(fontsize=8)
    return _save(fig, out / "gpu.png")


def autobatch_points(record: AutobatchRecord) -> Dict[int, List[Tuple[int, Optional[float], bool]]]:
    """Per training rank, in probe order: (micro-batch, peak memory GiB or None where it is not
    measured, fits) from a probed run's autobatch.json."""
    return {r["rank"]: [(p["size"], p["peak_bytes"] / 2**30 if p.get("peak_bytes") else None, p["fits"])
                        for p in r["probes"]] for r in record.per_rank}


def plot_autobatch(run: Run, out: Path) -> Optional[str]:
    """The probe's path (micro-batch per probe: fit or OOM) and, where memory was measured, peak memory
    against the micro-batch; the agreed choice on both."""
    points = autobatch_points(run.autobatch) if run.autobatch else {}
    if not any(points.values()):
        return None
    plt = _plt()
    measured = any(m is not None for pts in points.values() for _, m, _ in pts)
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(11 if measured else 7, 4), squeeze=False)
    path_ax = axes[0, 0]
    for rank, pts in sorted(points.items()):
        line, = path_ax.plot(range(1, len(pts) + 1), [b for b, _, _ in pts], "-", lw=1, label=f"rank {rank}")
        for i, (b, _, fits) in enumerate(pts, 1):
            path_ax.plot(i, b, "o" if fits else "x", color=line.get_color() if fits else "red", ms=7 if fits else 9)
    path_ax.axhline(run.autobatch.micro_batch, color="green", ls="--", label=f"chosen {run.autobatch.micro_batch}")
    path_ax.set_xlabel("probe")
    path_ax.set_ylabel("micro-batch (o fits, x out of memory)")
    path_ax.set_title(f"autobatch probe: {run.autobatch.reason}")
    path_ax.legend(fontsize=8)
    if measured:
        ax = axes[0, 1]
        for rank, pts in sorted(points.items()):
            fit = sorted((b, m) for b, m, good in pts if good and m is not None)
            if fit:
                ax.plot(*zip(*fit), "o-", label=f"rank {rank} fits")
        ax.axvline(run.autobatch.micro_batch, color="green", ls="--", label="chosen")
        ax.set_xlabel("micro-batch")
        ax.set_ylabel("peak memory GiB")
        ax.set_title("peak memory per probe")
        ax.legend(fontsize=8)
    return _save(fig, out / "autobatch.png")


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
    interesting = {k: v for k, v in counts.items() if k not in ("checkpoint", "start", "end")}
    if interesting:
        rows.append(("events", ", ".join(f"{k} x{v}" for k, v in sorted(interesting.items()))))
    if run.val:
        rows.append(("validations", str(len(run.val))))
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
            lines += ["Skipped: " + "; ".join(run.notes) + ".", ""]
        stall = (run.summary or {}).get("stall_by_cause")
        if stall:  # where the training thread's time went, and what the background took off it
            name = _save(stalls.figure(stall), out / (f"stalls-{i}.png" if len(runs) > 1 else "stalls.png"))
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
    if not any(r.metrics or r.val for r in runs):
        print(f"launcher: error: {', '.join(map(str, dirs))}: no metrics.jsonl or val/results.jsonl; "
              "is this a run directory?", file=sys.stderr)
        return 2
    report = RunDir(dirs[0]).report
    out = args.out or (report if len(dirs) == 1 else report / f"compare-{dirs[1].name}")
    path = write_report(runs, out)
    for r in runs:
        for note in r.notes:
            print(f"report: {r.name}: {note.replace('`', '')}; its plots are skipped")
    print(f"report: {path}")
    return 0
