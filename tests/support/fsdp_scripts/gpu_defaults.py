"""Run under torchrun (gloo, 2 ranks): what every fsdp run on a GPU does by default, on the CPU.

  gate     the EMA's device gate (EMA._update_gated, what ema.update runs on a GPU) with the flag the
           training step makes under fsdp (a DTensor norm); a NaN in one rank's gradient shard only must
           make every rank skip; kept steps bit-identical to the host path
  bn_bf16  a BatchNorm ResNet sharded with the bf16 policy: forward (autocast), backward, AdamW step
  sgd      build_optimizer(sgd) for a CUDA device on sharded parameters: not fused, and it steps

Writes {rank: results} as JSON to argv[1] (rank 0).
"""
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from launcher.distributed.groups import destroy_together
from launcher import step
from launcher.config.schema import Config, OptimConfig
from launcher.distributed import fsdp
from launcher.ema import EMA
from launcher.jobs.synthetic import ResNet
from launcher.optim import build_optimizer, build_scheduler
from launcher.precision import autocast

dist.init_process_group("gloo")
rank, group, cpu = dist.get_rank(), dist.group.WORLD, torch.device("cpu")
out = {}


def gate(clip: float) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fsdp.shard(model, group, cpu, "fp32")
    cfg = Config()
    cfg.train.grad_clip = clip
    opt = build_optimizer(model, cfg.optim, cpu)
    sched = build_scheduler(opt, cfg.sched, cfg.optim.lr, 10, 0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    device_gate, host_gate = EMA(model, 0.9, "none"), EMA(model, 0.9, "none")
    flags, types, same = [], set(), []
    for i in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * rank + i))
        model(x).square().mean().backward()
        if i == 2 and rank == 1:  # NaN in this rank's shard of one gradient only: every rank must skip
            model[0].weight.grad.to_local()[0, 0] = float("nan")
        before = {k: v.to_local().clone() for k, v in device_gate.shadow.items()}
        flag = step.optimizer_step(model, step.StepParts(opt, sched, scaler, None), cfg, i, gate=True)
        types.add(type(flag).__name__)
        flags.append(bool(flag))
        device_gate._update_gated(model, flag)  # the GPU path, here on the CPU
        host_gate.update(model, skip=bool(flag))
        same.append(all(torch.equal(device_gate.shadow[k].to_local(), host_gate.shadow[k].to_local())
                        for k in device_gate.shadow))
    kept = all(torch.equal(before[k], device_gate.shadow[k].to_local()) for k in before)
    return {"flags": flags, "types": sorted(types), "bit_equal": same, "skipped_kept_bits": kept,
            "updates": [device_gate.updates, host_gate.updates], "skipped": [device_gate.skipped, host_gate.skipped]}


def bn_bf16() -> dict:
    torch.manual_seed(0)
    model = ResNet(width=4, depth=(1, 1), classes=10)
    fsdp.shard(model, group, cpu, "bf16")
    opt = build_optimizer(model, OptimConfig(), cpu)
    try:
        for _ in range(2):
            with autocast(cpu, "bf16"):
                loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.arange(4))
            loss.backward()
            opt.step()
            opt.zero_grad()
        bn = model.features[1]
        return {"ok": True, "loss_finite": bool(torch.isfinite(loss)),
                "bn_dtypes": sorted({str(t.dtype) for t in (bn.weight, bn.running_mean)})}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def sgd() -> dict:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    fsdp.shard(model, group, cpu, "fp32")
    opt = build_optimizer(model, OptimConfig(name="sgd"), torch.device("cuda"))  # the CUDA default
    model(torch.randn(4, 8)).sum().backward()
    try:
        opt.step()
        return {"fused": opt.defaults["fused"], "ok": True}
    except Exception as e:  # noqa: BLE001
        return {"fused": opt.defaults["fused"], "ok": False, "error": str(e).splitlines()[0][:200]}


for name, fn in (("gate", lambda: gate(0.0)), ("gate_clipped", lambda: gate(1.0)), ("bn_bf16", bn_bf16),
                 ("sgd", sgd)):
    try:
        out[name] = fn()
    except Exception as e:  # noqa: BLE001 - every section reports, the test names the failure
        out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
results = [None] * dist.get_world_size()
dist.all_gather_object(results, out)
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
group = None  # no reference outlives the destroy
destroy_together()
