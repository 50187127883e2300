"""Issue 18: what train.strategy=fsdp saves per training rank, and what a validation costs it.

For a ViT-B/16-shaped job (86M parameters; 32x32 images so a CPU step is quick: the state's
size does not depend on the image size), on 2 and 4 gloo ranks, one AdamW step under ddp and
under fsdp through the launcher's own pieces (wrap.shard / wrap.for_loop, build_optimizer, EMA,
handoff.Writer), then per rank the bytes of: parameters, gradients, optimizer state and EMA
(local shards under fsdp; under ddp the EMA lives on rank 0 only), and the training thread's
stall per validation: `Writer.put()` of the EMA (ddp: rank 0's whole EMA; fsdp: each rank its
shards), the mean of 4 puts after the first. Memory is counted from the tensors, not from the
allocator: on a GPU fsdp's transient all-gather buffers come on top (with OOM recovery on, the
step's full parameters in the compute dtype; see README, Sharded training).

    python benchmarks/fsdp.py [--quick] [--nprocs 2,4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MB = 2 ** 20


def _local_bytes(t: torch.Tensor) -> int:
    from launcher.distributed.shards import local_and_layout
    local, _ = local_and_layout(t)
    return local.numel() * local.element_size()


def worker(strategy: str, layers: int, puts: int) -> None:
    """One rank under torchrun: one step, then count and time; rank 0 prints every rank's figures."""
    from launcher.distributed import wrap
    from launcher.validation import handoff
    from launcher.checkpoint.staging import Stage
    from tests.support.handoff import idle, put
    from launcher.distributed.groups import Dist
    from launcher.ema import EMA
    from launcher.distributed.env import Env
    from launcher.jobs.synthetic import Synthetic, SyntheticJob
    from launcher.optim import build_optimizer
    from launcher.config.schema import Config

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    device = torch.device("cpu")
    env = Env(rank, world, rank, world, 0, None, device)
    dist = Dist(env)
    cfg = Config()
    cfg.train.strategy = strategy
    cfg.optim.name = "adamw"
    torch.manual_seed(0)
    job = Synthetic(SyntheticJob(model="vit", image_size=32, layers=layers))
    model = wrap.shard(job.model(), cfg.train.strategy, dist.group, device, "fp32", job)
    net = wrap.for_loop(model, cfg, dist.group, device)
    opt = build_optimizer(model, cfg.optim, device)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))
    job.loss(net(x), y).backward()
    opt.step()
    sharded = strategy == "fsdp"
    ema = EMA(model) if sharded or rank == 0 else None
    mine = {"params": sum(_local_bytes(p) for p in model.parameters()),
            "grads": sum(_local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer": sum(_local_bytes(v) for s in opt.state.values() for v in s.values()
                             if isinstance(v, torch.Tensor)),
            "ema": ema.nbytes() if ema else 0}
    stall = []
    if ema is not None:
        run = tempfile.mkdtemp()
        os.makedirs(os.path.join(run, "val"), exist_ok=True)
        writer = handoff.Writer(run, "all", 0, rank=rank, world=world if sharded else None)
        stage = Stage(device)  # the checkpoint's snapshot the hand-off shares, as in training
        for i in range(puts + 1):
            while not idle(writer):  # validations are further apart than one write
                time.sleep(0.01)
            put(writer, i + 1, {"ema": ema.shadow}, stage)
        writer.flush()
        stall = writer.blocked_s[1:]
    mine["stall_ms"] = 1e3 * sum(stall) / len(stall) if stall else 0.0
    every = dist.all_gather_object(mine)
    if rank == 0:
        print("RESULT " + json.dumps(every), flush=True)
    dist.close(finished=True)


def run(strategy: str, nproc: int, layers: int, puts: int) -> list:
    cmd = common.python_cmd(nproc, __file__, "--worker", strategy, "--layers", str(layers), "--puts", str(puts))
    out = subprocess.run(cmd, cwd=common.ROOT, env={**common.env(), "OMP_NUM_THREADS": "1",
                                                    "PYTHONPATH": str(common.ROOT)},
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{strategy} on {nproc} ranks failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CPU/CI sizes (the same model: only the puts are fewer)")
    ap.add_argument("--nprocs", default="2,4")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--puts", type=int, default=4)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.layers, a.puts)
    rows, detail = [], {}
    for n in (int(v) for v in a.nprocs.split(",")):
        res = {s: run(s, n, a.layers, 2 if a.quick else a.puts) for s in ("ddp", "fsdp")}
        detail[n] = res
        total = {s: [sum(r[k] for k in ("params", "grads", "optimizer", "ema")) / MB for r in res[s]] for s in res}
        for s in res:
            print(f"{n} ranks {s}: per rank MB (params+grads+optimizer+EMA) "
                  + ", ".join(f"{t:.0f}" for t in total[s]))
        rows.append(common.row(f"ViT-B/16 state per rank, max over {n} ranks: fsdp vs ddp", max(total["fsdp"]),
                               max(total["ddp"]), "ddp", "MB", f"~{n}x less", max(total["ddp"]) / max(total["fsdp"])
                               >= 0.9 * n))
        stall = {s: max(r["stall_ms"] for r in res[s]) for s in res}
        rows.append(common.row(f"ViT-B/16 hand-off stall per validation, slowest of {n} ranks: fsdp vs ddp",
                               stall["fsdp"], stall["ddp"], "ddp (rank 0's whole EMA)", "ms"))
        print(f"{n} ranks: state per rank ddp {max(total['ddp']):.0f} MB vs fsdp {max(total['fsdp']):.0f} MB "
              f"({max(total['ddp']) / max(total['fsdp']):.2f}x less); stall per validation ddp "
              f"{stall['ddp']:.1f} ms vs fsdp {stall['fsdp']:.1f} ms")
    path = common.write("fsdp", torch.device("cpu"), rows, quick=a.quick, per_rank=detail,
                        notes=["bytes counted from the tensors each rank holds after one AdamW step (fp32); "
                               "the stall is Writer.put() on the training thread (the snapshot's copy is the checkpoint's)"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
