"""The report's plots: one PNG per function, from a `Run` of launcher/report.py (duck-typed: `train`, `val`,
`events`, `best`, `metrics`, `autobatch`, `name`, ...). Titles and legends name only what is drawn, and each
PNG carries them as JSON in its Description text, so tests (and people) can read what a plot says.
matplotlib runs on the Agg backend: no display needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from launcher.rundir import AutobatchRecord

Run = Any  # launcher.report.Run: report.py imports this module, not the other way round


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
    lrs = {r.get("lr") for run in runs for r in run.train}
    constant = len(lrs) == 1  # one value: a panel of a flat line says less than the title does
    fig, axes = plt.subplots(1 if constant else 2, 1, figsize=(8, 3.5 if constant else 6), sharex=True, squeeze=False)
    ax1, ax2 = axes[0, 0], None if constant else axes[1, 0]
    resumed, planned = False, []
    for run in runs:
        steps = [r["step"] for r in run.train]
        line, = ax1.plot(steps, [r["loss"] for r in run.train], label=run.name)
        if ax2 is not None:
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
    if ax2 is not None:
        ax2.set_ylabel("learning rate")
    (ax2 or ax1).set_xlabel("optimizer step")
    ax1.legend()
    notes = (["dotted: resume"] if resumed else []) + ([f"dash-dot: planned end, {', '.join(planned)}"]
                                                        if planned else [])
    notes = ([f"learning rate constant at {lrs.pop():.3g}"] if constant else []) + notes
    ax1.set_title(("loss" if constant else "loss and learning rate") + (f" ({'; '.join(notes)})" if notes else ""))
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
                    drawn, = ax.plot(steps, values, marker="o", ms=3, ls="--" if weights == "raw" else "-",
                                     label=label, **({"color": colour} if len(runs) > 1 else {}))
                    again = run.val_series(revalidated=True).get((weights, m))
                    if again:  # `launcher validate` on the finished run: the checkpoints, validated again
                        ax.plot(*again, "x", ms=7, color=drawn.get_color(), label=f"{label} re-validated")
            b = run.best
            if b and b.get("metric") == metric:
                ax.plot([b["step"]], [b["value"]], marker="*", ms=16, color=colour, mec="black", zorder=5, ls="",
                        label=f"best {b['value']:.4g} @ {b['step']}" + ("" if len(runs) == 1 else f" ({run.name})"))
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    title = "validation: raw (dashed) vs EMA (solid)" if plotted >= {"raw", "ema"} \
        else f"validation of the {' and '.join(sorted(plotted))} weights"
    again = any(run.revalidated for run in runs)
    axes[0, 0].set_title(title + ("; x: re-validated from checkpoints" if again else ""))
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
        ax.plot(steps, smooth, color=f"C{i}", lw=2, label=f"{run.name} (mean of the last {k} log lines)")
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
        ax1.plot([s for s, _ in pts], [g.get("util", float("nan")) for _, g in pts], label=label)  # none under MIG
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


def plot_stalls(stall: dict, path: Path) -> str:
    """One small bar chart from summary.json's `stall_by_cause`: seconds blocked per cause beside the work
    done in the background."""
    plt = _plt()
    rows = [(name, c["s"], "C3") for name, c in stall["causes"].items()]
    rows += [(f"{name} (background)", c["s"], "C0") for name, c in stall.get("background", {}).items()]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.4))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color=[r[2] for r in rows][::-1])
    ax.set_xlabel("seconds (red: the training thread blocked; blue: done off it)")
    ax.set_title(f"where the time went: blocked {stall['stalled_s']:.2f} s of {stall['wall_s']:.2f} s wall")
    return _save(fig, path)
