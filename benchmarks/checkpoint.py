"""What a checkpoint costs the training thread, with a ViT-B/16-shaped training state (86.6M parameters,
AdamW, EMA: 1.3 GB), on 1 and 2 ddp ranks and 2 fsdp ranks.

1. Stall per checkpoint: the training thread's time in `Checkpointer.save()` (the real one: the
   snapshot into its host buffers; serialization, sha256, the write and the commit run in the
   background), against the least any snapshot costs, a memcpy of the same tensors into buffers that
   exist already (on a GPU: the pinned device-to-host copy). The synchronous path of the previous
   version (torch.save into a buffer, sha256 of it, the write, all on the training thread) is
   measured beside them on 1 rank, in the same run.
2. Run speed: `launcher train` (user defaults, validation off) with checkpoint.every_steps=10 against
   checkpoints at the end only; steady-state samples/s, wall clock, best of interleaved repeats.
   `--before DIR` also runs the same two commands from another checkout (the previous version: the
   synchronous path), in the same run.

    python benchmarks/checkpoint.py                      # stalls on 1/2/2 ranks, speed on 1 (~25 min on 2 cores)
    git worktree add /tmp/before <commit> && python benchmarks/checkpoint.py --before /tmp/before
                                                         # + the previous version's speed, same run

Targets: CPU stall <= 1.5x the memcpy, speed >= 0.95; GPU stall <= 1.2x the pinned copy, speed >= 0.98.
Writes benchmarks/out/checkpoint.json (format: benchmarks/common.py).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import common

VIT_B = {"model": "vit", "image_size": 32, "num_classes": 1000}  # ViT-B/16's weights; 32 px keeps steps short


def training_state(strategy: str, device: torch.device):
    """The launcher's own pieces: the synthetic job's ViT-B/16, AdamW, the EMA, one step taken."""
    from launcher.config.schema import Config
    from launcher.distributed import fsdp
    from launcher.distributed.env import detect
    from launcher.distributed.groups import Dist
    from launcher.ema import EMA, NoEMA
    from launcher.jobs.synthetic import Synthetic, SyntheticJob
    from launcher.optim import build_optimizer

    env = detect(device=device.type)
    dist = Dist(env, timeout_s=600)
    cfg = Config()
    cfg.train.strategy = strategy
    torch.manual_seed(0)
    model = Synthetic(SyntheticJob(**VIT_B)).model().to(device)
    if strategy == "fsdp" and dist.distributed_training:
        model = fsdp.shard(model, dist.group, device, "fp32")
    net = torch.nn.parallel.DistributedDataParallel(model, process_group=dist.group) \
        if strategy == "ddp" and dist.distributed_training else model
    opt = build_optimizer(model, cfg.optim, device)
    x, y = torch.randn(2, 3, 32, 32, device=device), torch.randint(1000, (2,), device=device)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema = EMA(model, 0.999, "none") if env.is_main or fsdp.is_fsdp(model) else NoEMA()
    return cfg, env, dist, model, opt, ema


def stall_worker(out: Path, strategy: str, saves: int) -> None:
    """One process (or one torchrun worker): the real Checkpointer saving the ViT-B state `saves` times."""
    from launcher.checkpoint.checkpointer import Checkpointer, TrainState
    from launcher.distributed import fsdp
    from launcher.checkpoint.staging import flatten
    from launcher.rundir import RunDir
    from launcher.step import LossMeter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, env, dist, model, opt, ema = training_state(strategy, device)
    rundir = RunDir(out / "run").make()
    cfg.checkpoint.keep_last = 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = TrainState()
    tel = SimpleNamespace(event=lambda kind, **fields: None, wandb_id=None)
    ckpt = Checkpointer(cfg.checkpoint, env, dist, rundir, tel, state, per_rank={"meter": LossMeter(device)},
                        parts={"model": model, "optimizer": opt, "scheduler": sched,
                               "scaler": torch.amp.GradScaler(device.type, enabled=False), "ema": ema},
                        sharded=fsdp.is_fsdp(model))
    ckpt.prepare()  # as the loop does after the first step: the buffers, allocated in the background
    _, tensors = flatten(ckpt._state())
    stalls = []
    for step in range(1, saves + 1):
        ckpt.wait()  # the previous write finished: the save's stall is its snapshot (the speed runs show the rest)
        state.step = step
        t0 = time.perf_counter()
        ckpt.save(ckpt.snapshot())
        _sync(device)
        stalls.append(time.perf_counter() - t0)
    ckpt.close()
    row = {"rank": env.train_rank, "stall_s": stalls, "bytes": sum(_local(t).numel() * t.element_size() for t in tensors),
           "copy_s": copy_time(tensors, device)}
    if env.world_size == 1:
        row["old_s"] = old_save_time(ckpt, out / "old")
    rows = dist.all_gather_object(row)
    if env.is_main:
        (out / "stall.json").write_text(json.dumps(rows))
    dist.close(finished=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    from launcher.distributed.shards import is_sharded
    return t.to_local() if is_sharded(t) else t


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_time(tensors, device: torch.device, repeat: int = 5) -> float:
    """The baseline: one copy of the same tensors into host buffers that exist already (touched; pinned on
    a GPU), one flat buffer per dtype as the checkpointer's; the median of `repeat`."""
    from launcher.checkpoint.staging import HostBuffers

    src = [_local(t).detach() for t in tensors]
    dst = HostBuffers(tensors, pin=device.type == "cuda")
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        torch._foreach_copy_(dst.host, src, non_blocking=device.type == "cuda")
        _sync(device)
        times.append(time.perf_counter() - t0)
    dst.close()
    return statistics.median(times)


def old_save_time(ckpt, directory: Path, repeat: int = 3) -> float:
    """The previous version's save, all on the training thread: the state dicts, torch.save into a
    buffer, sha256 of it, the atomic write and the manifest (store.save before this change)."""
    from launcher.files import atomic_write, write_json

    directory.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        buf = io.BytesIO()
        torch.save({name: part.state_dict() for name, part in ckpt.parts.items()}, buf)
        digest = hashlib.sha256(buf.getbuffer()).hexdigest()
        atomic_write(directory / f"step-{i}.pt", lambda f: f.write(buf.getbuffer()))
        write_json(directory / f"step-{i}.json", {"sha256": digest, "bytes": buf.tell()})
        times.append(time.perf_counter() - t0)
        (directory / f"step-{i}.pt").unlink()
    return statistics.median(times)


def stalls(s: argparse.Namespace, tmp: Path, nproc: int, strategy: str) -> dict:
    out = tmp / f"stall-{nproc}-{strategy}"
    out.mkdir()
    cmd = common.python_cmd(nproc, __file__, "--worker", str(out), "--strategy", strategy, "--saves", str(s.saves))
    subprocess.run(cmd, cwd=common.ROOT, env=common.env(), check=True, timeout=1800)
    return json.loads((out / "stall.json").read_text())


def speed(s: argparse.Namespace, tmp: Path, every: int, root: Path = common.ROOT) -> float:
    """Steady-state samples/s (wall) of `launcher train` with checkpoint.every_steps=`every` (0: the end only),
    run from the checkout `root`."""
    metrics = tmp / f"speed-{every}-{time.monotonic_ns()}" / "metrics.jsonl"
    job = ["job=synthetic"] + [f"job.{k}={v}" for k, v in VIT_B.items()]
    cmd = common.python_cmd(1, "-m", "launcher", "train", *job, f"run.dir={metrics.parent}", f"batch.size={s.batch}",
                            f"train.max_steps={s.steps}", "train.log_every=1", "validation.mode=off",
                            f"checkpoint.every_steps={every}", "logger.progress=off", "logger.wandb.mode=disabled")
    return common.launcher_window(cmd, metrics, s.warmup, s.steps, s.batch, root=root)["wall_rate"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="accepted for run_all: the sizes are the same")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--saves", type=int, default=5, help="checkpoints per stall measurement")
    ap.add_argument("--steps", type=int, default=45, help="training steps per speed run")
    ap.add_argument("--warmup", type=int, default=12, help="steps before the timed window (the buffers are "
                    "allocated in the background after the first step)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved speed repeats; the best of each is kept")
    ap.add_argument("--before", help="another checkout (the previous version) whose speed to measure alongside")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-stall", action="store_true")
    s = ap.parse_args()
    if s.worker:
        return stall_worker(Path(s.worker), s.strategy, s.saves)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    stall_target, speed_target = (1.2, 0.98) if gpu else (1.5, 0.95)
    copy_name = "pinned D2H copy of the state" if gpu else "memcpy of the state"
    load = os.getloadavg()
    rows, notes = [], [f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores"]
    common.OUT.mkdir(parents=True, exist_ok=True)  # checkpoints on the disk a run dir uses (and git ignores)
    with tempfile.TemporaryDirectory(dir=common.OUT) as tmp:
        for nproc, strategy in () if s.no_stall else ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
            per_rank = stalls(s, Path(tmp), nproc, strategy)
            stall = max(statistics.median(r["stall_s"]) for r in per_rank)  # the slowest rank sets the pace
            copy = max(r["copy_s"] for r in per_rank)
            gb = sum(r["bytes"] for r in per_rank) / 2**30
            case = f"stall per checkpoint, {nproc} {strategy} rank{'s' * (nproc > 1)} ({gb:.2f} GB)"
            rows.append(common.row(case, round(stall * 1e3, 1), round(copy * 1e3, 1), copy_name, "ms",
                                   f"<= {stall_target}x", stall <= stall_target * copy, round(copy / stall, 3)))
            notes.append(f"{case}: each save {[round(x * 1e3) for r in per_rank for x in r['stall_s']]} ms "
                         "(rank after rank; each save once the previous write had finished)")
            if "old_s" in per_rank[0]:
                old = per_rank[0]["old_s"]
                rows.append(common.row("before: synchronous save, 1 rank (torch.save + sha256 + write)",
                                       round(old * 1e3, 1), round(copy * 1e3, 1), copy_name, "ms", None, None,
                                       round(copy / old, 3)))
        if not s.no_speed:
            runs = {"every 10": lambda: speed(s, Path(tmp), 10), "end only": lambda: speed(s, Path(tmp), 0)}
            if s.before:
                before = Path(s.before).resolve()
                runs.update({"before, every 10": lambda: speed(s, Path(tmp), 10, before),
                             "before, end only": lambda: speed(s, Path(tmp), 0, before)})
            best = dict(zip(runs, common.best_of(s.repeat, *runs.values())))
            for prefix in ("", "before, ") if s.before else ("",):
                ours, base = best[f"{prefix}every 10"], best[f"{prefix}end only"]
                rows.append(common.row(f"{prefix}run speed, checkpoint.every_steps=10, 1 rank", round(ours, 2),
                                       round(base, 2), "checkpoints at the end only", "samples/s",
                                       None if prefix else f">= {speed_target}",
                                       None if prefix else ours / base >= speed_target, round(ours / base, 4)))
            notes.append(f"speed: launcher train job=synthetic job.model=vit job.image_size=32 batch.size={s.batch} "
                         f"train.max_steps={s.steps} validation.mode=off, steps {s.warmup}-{s.steps} timed (wall), "
                         f"best of {s.repeat} interleaved; with every_steps=10 the state is written "
                         f"{sum(k % 10 == 0 for k in range(s.warmup + 1, s.steps))} times inside the window")
    notes.append(f"load average at the end {os.getloadavg()[0]:.2f}")
    common.print_rows(rows)
    print("\n".join(notes))
    common.write("checkpoint", device, rows, quick=s.quick, notes=notes)


if __name__ == "__main__":
    main()
