"""The training loop, top to bottom.

Each optimizer step consumes one per-rank *step batch* of `micro * accum` samples
from the loader and splits it into micro-batches. The effective batch is therefore
fixed by the data, not by the micro-batch: changing `micro` (autobatch, OOM
recovery) only changes how the same samples are cut up.

`train()` composes the leaves; each owns its state and its cadence (telemetry
decides when to log, validation when to validate, the checkpointer when to save).
"""
from __future__ import annotations

import logging
import time

import torch
from torch.utils.data import DataLoader, DistributedSampler

from launcher import jobs
from launcher import data
from launcher.batch import probe
from launcher.dist import fsdp
from launcher.dist import wrap
from launcher.checkpoint.checkpointer import Checkpointer, TrainState
from launcher.checkpoint.export import save_weights
from launcher.dist.groups import Dist
from launcher.dist.rng import seed_everything
from launcher.ema import EMA, NoEMA, auto_tau
from launcher.dist.env import Env
from launcher.faults import Faults
from launcher.batch.recovery import Headroom, Recovery, StepOOM
from launcher.optim import build_optimizer, build_scheduler, warmup_steps
from launcher.precision import autocast, resolve_precision
from launcher.rundir import RunDir
from launcher.config.schema import Config
from launcher.errors import ConfigError
from launcher.dist.signals import Guard, Stop
from launcher.telemetry import Telemetry
from launcher.telemetry.stalls import Stalls
from launcher.validation.evaluation import best_by_weights
from launcher.step import LossMeter, forward_backward, optimizer_step
from launcher.validation.trainer_side import due, for_training

log = logging.getLogger("launcher.train")


def train(cfg: Config, env: Env, dist: Dist, rundir: RunDir) -> dict:
    device = env.device
    precision = resolve_precision(cfg.train.precision, device)
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    job = jobs.load(cfg.job)
    model = wrap.setup(job.model().to(device), cfg.train)  # cudnn.benchmark, TF32, channels_last weights
    group = dist.group if dist.distributed_training else None
    model = wrap.shard(model, cfg, group, device, precision, job)  # fsdp: FSDP2 in place; ddp: as is
    sharded = fsdp.is_sharded(model)  # every training rank keeps the EMA of its own shards (else rank 0 alone)
    train_set, val_set = job.datasets()
    faults = Faults(cfg.debug, env, rundir)
    faults.arm_forward(model)

    # The micro-batch (probed and agreed by all ranks with batch.size=auto) and the fixed per-rank step batch.
    def make_ema(m, total_steps=0):  # ema.tau unset: scaled to the run's length (the probe's EMA is thrown away)
        tau = cfg.ema.tau if cfg.ema.tau is not None else auto_tau(total_steps)
        return EMA(m, cfg.ema.decay, cfg.ema.ramp, tau) if cfg.ema.enabled else NoEMA()

    batch, autobatch_event = probe.choose(
        cfg, env, dist, rundir, model, job, train_set, precision, lambda: autocast(device, precision),
        lambda m: build_optimizer(m, cfg.optim, device), make_ema)
    sampler = DistributedSampler(train_set, num_replicas=env.train_world, rank=env.train_rank,
                                 shuffle=True, seed=cfg.run.seed, drop_last=True)
    steps_per_epoch = len(sampler) // batch.step
    if steps_per_epoch == 0:
        raise ConfigError(f"the effective batch {batch.global_size} is larger than the training set "
                          f"({len(train_set)} samples); lower batch.size or batch.global_size")
    total = steps_per_epoch * cfg.train.epochs if cfg.train.epochs else cfg.train.max_steps
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    warmup = warmup_steps(cfg.sched, steps_per_epoch)

    opt = build_optimizer(model, cfg.optim, device)
    sched = build_scheduler(opt, cfg.sched, cfg.optim.lr, total, warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = make_ema(model, total // cfg.ema.every) if env.is_main or sharded else NoEMA()
    log.info(ema.describe())
    ddp = wrap.wrap(model, cfg, group, device)  # DDP (fsdp: the sharded model itself), compile
    tel = Telemetry(rundir, cfg, env, total, enabled=env.is_main)
    tel.event("autobatch", **autobatch_event)

    state, meter, stalls = TrainState(batch), LossMeter(device), Stalls()  # stalls: where the training thread waited
    ckpt = Checkpointer(cfg, env, dist, rundir, tel, state, per_rank={"meter": meter},
                        parts={"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler, "ema": ema},
                        stalls=stalls)
    if not ckpt.restore():
        if cfg.run.resume == "must":
            raise ConfigError(f"run.resume=must but {rundir.checkpoints} holds no loadable checkpoint; "
                              "use run.resume=auto to start fresh")
        seed_everything(cfg.run.seed + env.rank)  # per-rank randomness (dropout, augmentation)
    guard = Guard(cfg, dist, tel, early_stop=lambda: validation.stop_requested(),  # stop signals, early stop,
                  save_failed=ckpt.failed, stalls=stalls)  # a failed background checkpoint
    oom = Recovery(cfg, env, dist, rundir, ddp, tel, state,
                   Headroom(device, autobatch_event.get("backward_headroom_bytes"), env.train_rank, faults.low_memory),
                   guard)
    if oom.enabled:
        faults.arm_oom(model, state, lambda: oom.phase)
    faults.arm_nan(model, state)
    guard.log_restart(env.restart_count, state.step)
    tel.event("start", world=env.world_size, train_world=env.train_world, micro_batch=batch.micro,
              accum=batch.accum, global_batch=batch.global_size, steps=total, steps_per_epoch=steps_per_epoch,
              precision=precision, device=str(device), start_step=state.step, strategy="fsdp" if sharded else "ddp")
    validation = for_training(cfg, env, rundir, job, val_set, model, ema, batch.micro, tel, ckpt)

    log.info("training %d steps: %d rank(s) x micro-batch %d x accum %d = batch %d, %s on %s",
             total, env.train_world, batch.micro, batch.accum, batch.global_size, precision, device)
    try:  # however training ends (done, a stop, exit 75, an error): the save in flight finishes first
        t_start, stopped_early, stop = time.time(), False, Stop()
        ddp.train()
        indices = data.EpochIndices()  # one loader for the run: its workers persist across epochs
        loader = DataLoader(train_set, batch_size=batch.step, sampler=indices, drop_last=True,
                            **data.train_loader_options(cfg.data, device))
        while state.step < total and not stopped_early and not stop:
            sampler.set_epoch(state.epoch)
            indices.set(list(sampler)[state.batch_in_epoch * batch.step: steps_per_epoch * batch.step])
            for x, y in loader:
                if cfg.train.channels_last and x.ndim == 4:  # NHWC in the copy to the device, from pinned memory
                    x = x.to(device, non_blocking=True, memory_format=torch.channels_last)

                # Forward and backward over the micro-batches. An OOM on any rank before the last backward
                # is agreed on by all; each then redoes this step batch with half the micro-batch (oom.py).
                while True:
                    try:
                        step_loss = forward_backward(x, y, state.batch, ddp, job, scaler, oom, device, precision)
                        break
                    except StepOOM as e:
                        opt.zero_grad(set_to_none=True)
                        state.batch = oom.recover(state.batch, e, state.step)

                # Optimizer step; the EMA follows unless the step must not count (see optimizer_step).
                ema_due = (state.step + 1) % cfg.ema.every == 0
                skip = optimizer_step(model, opt, sched, scaler, cfg, state.step, warmup,
                                      gate=ema_due and (env.is_main or sharded) and cfg.ema.enabled)
                state.step += 1
                state.batch_in_epoch += 1
                if ema_due:
                    validation.fence()  # the last hand-off's copy out of the EMA finished (a GPU-side wait)
                    ema.update(model, skip=skip)
                meter.add(step_loss, batch.global_size)

                last = state.step == total
                if tel.should_log(state.step, last):
                    with stalls.measure("logging"):
                        tel.metrics({"step": state.step, "epoch": state.epoch, **meter.take(dist, env.train_world),
                                     "lr": sched.get_last_lr()[0], "time": time.time(), **ema.stats()})
                        validation.poll()  # new validation results, skipped snapshots, a dead validator
                end_of_epoch = state.batch_in_epoch == steps_per_epoch
                validating = due(cfg, env.world_size, state.step, state.epoch, end_of_epoch, last)  # every rank: saves
                if validation.should_validate(state.step, state.epoch, end_of_epoch, last):
                    with stalls.measure(validation.stall):  # a hand-off shares the checkpoint's snapshot of this step
                        validation.submit(state.step, state.epoch)
                if end_of_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                # A stop signal or the validator's early stop: every training rank stops at this same step.
                stop, stopped_early = guard.step_end(again=validating)  # agreed by all (in the OOM agreement if on)
                if stopped_early:
                    log.info("early stop at step %d", state.step)
                if ckpt.should_save(state.step, last or stopped_early or bool(stop) or validating):  # in the background;
                    ckpt.save(protect=validation.protected_steps(), final=last or stopped_early or bool(stop))  # the last waits
                faults.step_end(state.step, tel, dist, settle=ckpt.wait)
                if last or stopped_early or stop:
                    break

        if stop and state.step < total:  # preempted: checkpointed, not finished; no summary, exit 128 + signal
            validation.flush()  # snapshots already handed off reach the disk
            guard.exit(stop, state.step)

        # The end: deployable EMA weights, the summary.
        summary = {"steps": state.step, "epochs": state.epoch, "stopped_early": stopped_early,
                   "micro_batch": state.batch.micro, "accum": state.batch.accum, "global_batch": batch.global_size,
                   "wall_time_s": round(time.time() - t_start, 2),
                   "stall_by_cause": stalls.summary(time.time() - t_start)}  # the training thread's waits, by cause
        final_ema = fsdp.full_state(ema.shadow, keep=env.is_main)  # fsdp: every training rank gathers; ddp: rank 0's
        summary.update(validation.finish(state.step, state.epoch))  # drains: the final weights are validated
        if cfg.validation.weights == "both":  # best and final raw and EMA side by side
            summary.update(best_by_weights(rundir.read_results(), cfg.validation.metric, cfg.validation.goal))
        if env.is_main:
            if cfg.ema.enabled:
                save_weights(rundir.ema_weights, final_ema, {"step": state.step, "updates": ema.updates})
            summary.update(ema.stats(), **({"ema_tau": ema.tau} if cfg.ema.enabled else {}))
            rundir.write_summary(summary)
            tel.event("end", **summary)
            best = f", best {summary['best_metric']} {summary['best_value']:.4f} at step {summary['best_step']}" \
                if "best_step" in summary else ""
            log.info(f"done: {state.step} steps in {summary['wall_time_s']:.1f}s{best}; run dir {rundir}")
        tel.close()
        return summary
    finally:
        ckpt.close()
