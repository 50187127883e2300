"""Shell completion latency: one TAB (`launcher -sc query=bash`, a fresh process, as bash runs it).

Ours: launcher/config/completion.py with its cache filled (`-sc install=bash` fills it). Baseline: Hydra's
own completer on the same schema (what a TAB ran before issue 27: it composes the config, and the jobs'
schemas import torch). Best (smallest) of N interleaved runs: load only ever slows a process down.

    python benchmarks/completion.py [--quick]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import torch

from common import ROOT, env, print_rows, row, write

HYDRA = ("import sys; sys.argv = ['launcher', '-sc', 'query=bash']; from launcher.config import schema, compose; "
         "schema.register(); compose.hydra_main(['-sc', 'query=bash'], None)")


def tab(cmd, cache: str, line: str) -> float:
    """Seconds for one completion process to answer `line`."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env={**env(), "XDG_CACHE_HOME": cache, "COMP_LINE": line},
                         capture_output=True, text=True, check=True).stdout
    assert "optim.lr=" in out, out
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    n = 5 if args.quick else 15
    with tempfile.TemporaryDirectory() as cache:
        subprocess.run([sys.executable, "-m", "launcher", "train", "-sc", "install=bash"], cwd=ROOT,
                       env={**env(), "XDG_CACHE_HOME": cache}, capture_output=True, check=True)
        ours, hydra = [], []
        for _ in range(n):
            ours.append(tab([sys.executable, "-m", "launcher", "-sc", "query=bash"], cache, "launcher train optim.l"))
            hydra.append(tab([sys.executable, "-c", HYDRA], cache, "launcher optim.l"))  # Hydra's: no command word
    rows = [row("one TAB, warm cache (best of %d)" % n, min(ours), min(hydra), "Hydra's completer", "s",
                target="< 0.5 s", met=min(ours) < 0.5)]
    print_rows(rows)
    write("completion", torch.device("cpu"), rows, quick=args.quick,
          notes=[f"median: ours {sorted(ours)[n // 2]:.3f} s, Hydra's {sorted(hydra)[n // 2]:.3f} s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
