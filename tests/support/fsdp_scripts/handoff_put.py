"""Run under torchrun (gloo, CPU): every rank puts its shards of a state through its own hand-off Writer,
from a snapshot of them as training takes it (tests/support/handoff.put).

The state: `--state synthetic` (a few tensors, one with fewer rows than ranks, a replicated buffer),
`--state module` (a tiny fully_shard-ed model's state_dict: sharded parameters, plain BatchNorm
buffers), or a safetensors file (a ddp run's ema.safetensors), each sharded along dim 0 with
distribute_tensor. Snapshot `step` holds the state plus `step` (so steps differ; `--same`: the state). Rank 0 writes the
full tensors of each step to <run>/full-<step>.safetensors for the test to compare with.
`--hold-rank R`: rank R waits for <run>/release before its first put (a slow rank).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from launcher.checkpoint.staging import Stage
from launcher.distributed.groups import destroy_together
from launcher.validation import handoff
from tests.support.handoff import idle, put


def build(kind: str, mesh) -> dict:
    torch.manual_seed(0)
    if kind == "module":
        from torch.distributed.fsdp import fully_shard
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
        model(torch.randn(8, 4))  # BatchNorm running stats move off their init
        fully_shard(model, mesh=mesh)
        return model.state_dict()
    if kind == "synthetic":
        full = {"w": torch.randn(7, 3), "b": torch.randn(2), "h": torch.randn(4, 2, 2).to(torch.bfloat16),
                "bn_mean": torch.randn(3), "n": torch.tensor(7)}
        plain = {"bn_mean", "n"}
    else:
        full = load_file(kind)
        plain = {k for k, v in full.items() if v.ndim == 0}
    return {k: v if k in plain else distribute_tensor(v, mesh, [Shard(0)]) for k, v in full.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    p.add_argument("--state", default="synthetic")
    p.add_argument("--steps", default="10")
    p.add_argument("--policy", default="all")
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--hold-rank", type=int, default=-1)
    p.add_argument("--same", action="store_true", help="every step holds the state unchanged")
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    run = Path(a.run_dir)
    (run / "val").mkdir(parents=True, exist_ok=True)
    state = build(a.state, mesh)
    w = handoff.Writer(run, a.policy, a.keep, rank=rank, world=world)
    stage = Stage(torch.device("cpu"))  # the checkpoint's snapshots, as training takes them
    dist.barrier()  # rank 0's Writer swept the previous session's leftovers before anyone writes
    for i, step in enumerate(int(s) for s in a.steps.split(",")):
        snap = {k: v + (0 if a.same else step) if v.is_floating_point() else v for k, v in state.items()}
        full = {f"ema/{k}": (v.full_tensor() if isinstance(v, DTensor) else v).contiguous() for k, v in snap.items()}
        if rank == 0:
            save_file(full, str(run / f"full-{step}.safetensors"))
        dist.barrier()
        if rank == a.hold_rank and i == 0:
            while not (run / "release").exists():
                time.sleep(0.05)
        assert put(w, step, {"ema": snap}, stage) is not None
        while not idle(w):  # in step order, one at a time: the test looks at each step's files
            time.sleep(0.01)
    w.flush()
    print(f"rank {rank}: blocked_ms {[round(b * 1e3, 3) for b in w.blocked_s]}", flush=True)
    destroy_together()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
