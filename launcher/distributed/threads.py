"""CPU threads per process, so the trainer, the validator and the data loader do not fight over cores.

torch starts one intra-op thread per core in every process. A plain `python -m launcher train` on
the CPU runs the trainer and a validator process side by side (validation.mode=auto), so each would
spin as many threads as there are cores: on 2 cores a run took 2-7x as long as with one thread each.
The rule (`train.threads`, else OMP_NUM_THREADS, else the cores split):

- `train.threads=N`: N threads for each training process; the validator child gets the cores left.
- OMP_NUM_THREADS set (torchrun sets 1 for its workers when there are several): honoured as is.
- otherwise the cores this process may use are split evenly between the node's training processes
  and the validator child; the child inherits its share as OMP_NUM_THREADS.
Data loader workers use one thread each (torch's own rule).
"""
from __future__ import annotations

import os
from typing import Tuple

import torch


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def split(n: int, local_world: int, child: bool) -> Tuple[int, int]:
    """(threads per training process, threads of the validator child, 0 without one) on `n` cores."""
    trainer = max(1, n // (local_world + child))
    return trainer, max(1, n - trainer * local_world) if child else 0


def apply(configured: int, local_world: int, child: bool) -> dict:
    """Set this process's threads and export the validator child's; what was chosen, and why."""
    n, omp = cores(), os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured > 0:
        trainer, source = configured, "train.threads"
        validator = max(1, n - configured * local_world) if child else 0
    elif omp.isdigit() and int(omp) > 0:
        return {"trainer": torch.get_num_threads(), "validator": int(omp) if child else 0, "cores": n,
                "source": "OMP_NUM_THREADS"}
    else:
        (trainer, validator), source = split(n, local_world, child), "auto"
    torch.set_num_threads(trainer)
    if child:
        os.environ["OMP_NUM_THREADS"] = str(validator)  # the validator process inherits it
    return {"trainer": trainer, "validator": validator, "cores": n, "source": source}
