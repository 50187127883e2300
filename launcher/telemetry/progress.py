"""Progress: a rich bar on a TTY, plain `key=value` lines otherwise (Slurm, CI, progress=plain)."""
from __future__ import annotations

import logging
import math
import sys
from typing import Optional

log = logging.getLogger("launcher")
plog = logging.getLogger("launcher.progress")


def _fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(row: dict, total: int, eta_s: Optional[float], last_val: Optional[dict]) -> str:
    """One `train key=value ...` line: grep-able in Slurm logs, parseable with str.split('=')."""
    parts = [f"step={row['step']}/{total}", f"epoch={row['epoch']}"]
    for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.3e}"), ("samples_per_s", "{:.1f}")):
        if key in row:
            parts.append(f"{key}=" + fmt.format(row[key]))
    parts.append(f"eta={_fmt_eta(eta_s)}")
    if last_val:
        parts.append(f"val_{last_val['metric']}={last_val['value']:.4f}@{last_val['step']}")
    return "train " + " ".join(parts)


class PlainProgress:
    """Periodic log lines; `console=False` keeps them in logs/rank-0.log only (progress=off)."""

    def __init__(self, total: int, console: bool = True):
        self.total, self.console = total, console

    def update(self, row: dict, eta_s: Optional[float], last_val: Optional[dict]) -> None:
        plog.info(progress_line(row, self.total, eta_s, last_val), extra={"console": self.console})

    def close(self) -> None:
        pass


class RichProgress(PlainProgress):
    """A rich bar on the console (the same line still goes to the log file). Epoch, bar, step count and ETA (the
    plain line's) keep their width on any terminal; the text after them (the last validation first, then loss,
    LR, throughput) is cut with an ellipsis where the terminal ends. `console`: rich's Console (default: stdout)."""

    def __init__(self, total: int, console=None):
        super().__init__(total, console=False)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.table import Column

        fixed = {"table_column": Column(no_wrap=True)}
        self.bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}", **fixed), BarColumn(20, **fixed),
                            MofNCompleteColumn(**fixed), TextColumn("eta {task.fields[eta]}", **fixed),
                            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                                  ratio=1)),
                            transient=False, expand=True, console=console)
        self.task = self.bar.add_task("train", total=total, epoch=0, eta=_fmt_eta(None), info="")
        self.bar.start()
        # Console log lines go through rich's stdout proxy, so they print above the bar, not through it.
        self.handlers = [h for h in logging.getLogger().handlers
                         if type(h) is logging.StreamHandler and h.stream is sys.__stdout__]
        self.streams = [h.setStream(sys.stdout) for h in self.handlers]

    def update(self, row: dict, eta_s: Optional[float], last_val: Optional[dict]) -> None:
        super().update(row, eta_s, last_val)
        info = f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row.get('samples_per_s', 0):.0f} samples/s"
        if last_val:
            info = f"val {last_val['metric']} {last_val['value']:.4f} @ {last_val['step']} | {info}"
        self.bar.update(self.task, completed=row["step"], epoch=row["epoch"], eta=_fmt_eta(eta_s), info=info)

    def close(self) -> None:
        self.bar.stop()
        for h, stream in zip(self.handlers, self.streams):
            h.setStream(stream)


def make_progress(mode: str, total: int, isatty: Optional[bool] = None):
    isatty = sys.stdout.isatty() if isatty is None else isatty
    if mode == "rich" or (mode == "auto" and isatty):
        try:
            return RichProgress(total)
        except Exception as e:  # a broken terminal must not stop training
            log.info("progress: rich bar unavailable (%s); plain lines instead", e)
    return PlainProgress(total, console=mode != "off")
