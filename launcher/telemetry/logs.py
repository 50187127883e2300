"""Log files and the console: logs/rank-<r>.log for every process, the console for one."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Union


FILE_ONLY = {"console": False}  # `log.info(..., extra=FILE_ONLY)`: in the log file, not on the console


class _ConsoleFilter(logging.Filter):
    """Records logged with extra=FILE_ONLY go to the log file only: events, validation rows, set-up details, the
    plain progress line under a rich bar or progress=off. The console keeps what a person must know."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


def setup_logging(log_file: Optional[Path], rank: Union[int, str], console: bool = True) -> None:
    """Every process logs to its own file (logs/rank-<r>.log); `console`: this one talks on the console
    too (the CLI asks it of rank 0, or a lone process, and of the validator rank)."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if console:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh.setLevel(logging.INFO)
        sh.addFilter(_ConsoleFilter())
        root.addHandler(sh)
