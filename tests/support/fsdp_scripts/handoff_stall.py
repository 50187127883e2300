"""Measure the training thread's stall per validation, put()'s duration, for a ViT-B/16-shaped EMA
(86M fp32 parameters, 152 tensors), given the checkpoint's snapshot of the step as training hands it
(its own copy timed apart: `snapshot_ms`): under torchrun every rank puts its dim-0 shards (fsdp,
sharded Writer); `--ddp` (one process): the whole state through the single writer, as rank 0 does
under ddp. Prints one JSON line per rank: the blocked times in ms (mean, max, all) and the bytes per rank.
Not a test (a benchmark helper): run it by hand, e.g.
  torchrun --nproc_per_node=2 tests/support/fsdp_scripts/handoff_stall.py --run-dir /tmp/stall
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def vit_b16() -> dict:
    d, mlp, out = 768, 3072, {}
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = torch.randn(d, 3, 16, 16), torch.randn(d)
    out["cls_token"], out["pos_embed"] = torch.randn(1, 1, d), torch.randn(1, 197, d)
    for b in range(12):
        for name, shape in (("norm1.weight", (d,)), ("norm1.bias", (d,)), ("attn.qkv.weight", (3 * d, d)),
                            ("attn.qkv.bias", (3 * d,)), ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                            ("norm2.weight", (d,)), ("norm2.bias", (d,)), ("mlp.fc1.weight", (mlp, d)),
                            ("mlp.fc1.bias", (mlp,)), ("mlp.fc2.weight", (d, mlp)), ("mlp.fc2.bias", (d,))):
            out[f"blocks.{b}.{name}"] = torch.randn(shape)
    out["norm.weight"], out["norm.bias"] = torch.randn(d), torch.randn(d)
    out["head.weight"], out["head.bias"] = torch.randn(1000, d), torch.randn(1000)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default=None)
    p.add_argument("--puts", type=int, default=6)
    p.add_argument("--ddp", action="store_true")
    a = p.parse_args()
    from launcher.checkpoint.staging import Stage
    from launcher.validation import handoff
    from tests.support.handoff import idle, snapshot
    run = a.run_dir or tempfile.mkdtemp()
    os.makedirs(os.path.join(run, "val"), exist_ok=True)
    torch.manual_seed(0)
    state = vit_b16()
    rank, world = 0, None
    if not a.ddp:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        state = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in state.items()}
    w, stage, copies = handoff.Writer(run, "latest", 1, rank=rank, world=world), Stage(torch.device("cpu")), []
    for i in range(a.puts):
        while not idle(w):  # the interval between validations is longer than a write
            time.sleep(0.01)
        if world:
            dist.barrier()
        t0 = time.perf_counter()
        snap = snapshot(stage, (i + 1) * 100, {"ema": state})
        copies.append(round((time.perf_counter() - t0) * 1e3, 2))
        w.put((i + 1) * 100, 0, snap, snap.weights)
    w.flush()
    ms = [round(b * 1e3, 2) for b in w.blocked_s]
    nbytes = sum(t.numel() * t.element_size() for t in w.spare[0].values())
    print(json.dumps({"rank": rank, "world": world or 1, "ddp": a.ddp, "tensors": len(state), "bytes": nbytes,
                      "blocked_ms_mean": round(sum(ms) / len(ms), 2), "blocked_ms_max": max(ms), "blocked_ms": ms,
                      "snapshot_ms": copies}), flush=True)


if __name__ == "__main__":
    main()
