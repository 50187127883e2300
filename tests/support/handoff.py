"""Hand-offs in tests and benchmarks, on the path training takes: a checkpoint-style snapshot of the
weights (checkpoint/staging.py) handed to the Writer, which copies them out and writes them."""
from typing import Dict

import torch

from launcher.checkpoint.staging import Snapshot, Stage
from launcher.validation.handoff import Writer


def snapshot(stage: Stage, step: int, states: Dict[str, Dict[str, torch.Tensor]]) -> Snapshot:
    """`states` ({kind: state dict}) staged as the Checkpointer stages a step: into the stage's buffers,
    with the weights by kind."""
    snap = stage.take({"weights": states}, step)
    snap.weights = snap.state["weights"]
    return snap


def put(writer: Writer, step: int, states: Dict[str, Dict[str, torch.Tensor]], stage: "Stage | None" = None,
        epoch: int = 0):
    """Hand off `states` at `step` as training does: snapshot, then Writer.put; returns put()'s answer."""
    snap = snapshot(stage or Stage(torch.device("cpu")), step, states)
    return writer.put(step, epoch, snap, snap.weights)


def idle(writer: Writer) -> bool:
    """Nothing queued, being copied or being written."""
    return writer.idle()
