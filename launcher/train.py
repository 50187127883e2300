"""The training loop, top to bottom.

Each optimizer step consumes one per-rank *step batch* of `micro * accum` samples
from the loader and splits it into micro-batches. The effective batch is therefore
fixed by the data, not by the micro-batch: changing `micro` (autobatch, OOM
recovery) only changes how the same samples are cut up.
"""
from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

import jobs
from launcher import autobatch, checkpoint, speed
from launcher.dist import Dist, rng_state, seed_everything, set_rng_state
from launcher.ema import EMA, auto_tau
from launcher.env import Env
from launcher.files import read_jsonl, write_json
from launcher.optim import build_optimizer, build_scheduler, set_momentum, warmup_steps
from launcher.schema import Config, ConfigError
from launcher.signals import Guard, Stop
from launcher.telemetry import Telemetry
from launcher.validator import autocast, best_by_weights, for_training, resolve_precision, save_weights

log = logging.getLogger("launcher.train")


def train(cfg: Config, env: Env, dist: Dist, run_dir: Path) -> dict:
    device = env.device
    precision = resolve_precision(cfg.train.precision, device)
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    job = jobs.load(cfg.job)
    model = job.model().to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set, val_set = job.datasets()

    # Batch geometry: the micro-batch (probed and agreed by all ranks with batch.size=auto) and the
    # per-rank step batch, which stays fixed; a runtime OOM only changes how it is cut (batch.micro).
    def make_ema(m, total_steps=0):  # ema.tau unset: scaled to the run's length (the probe's EMA is thrown away)
        tau = cfg.ema.tau if cfg.ema.tau is not None else auto_tau(total_steps)
        return EMA(m, cfg.ema.decay, cfg.ema.ramp, tau) if cfg.ema.enabled else None

    batch, autobatch_event = autobatch.choose(
        cfg, env, dist, run_dir, model, job, train_set, precision, lambda: autocast(device, precision),
        lambda m: build_optimizer(m, cfg.optim, device), make_ema)
    step_batch, global_batch = batch.step, batch.global_size
    sampler = DistributedSampler(train_set, num_replicas=env.train_world, rank=env.train_rank,
                                 shuffle=True, seed=cfg.run.seed, drop_last=True)
    steps_per_epoch = len(sampler) // step_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"the effective batch {global_batch} is larger than the training set "
                          f"({len(train_set)} samples); lower batch.size or batch.global_size")
    total = steps_per_epoch * cfg.train.epochs if cfg.train.epochs else cfg.train.max_steps
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    warmup = warmup_steps(cfg.sched, steps_per_epoch)

    opt = build_optimizer(model, cfg.optim, device)
    sched = build_scheduler(opt, cfg.sched, cfg.optim.lr, total, warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = make_ema(model, total // cfg.ema.every) if env.is_main else None  # rank 0 alone keeps the EMA
    if ema is not None:
        mb = sum(v.numel() * v.element_size() for v in ema.shadow.values()) / 2**20
        log.info("EMA kept on this rank: %d tensors, %.2f MB fp32, tau %.0f", len(ema.shadow), mb, ema.tau)
    else:
        log.info("EMA: none on this rank")
    ddp = speed.wrap(model, cfg, dist.group if dist.distributed_training else None, device)  # DDP, compile
    tel = Telemetry(run_dir, enabled=env.is_main, total_steps=total, cfg=cfg, env=env)
    tel.event("autobatch", **autobatch_event)
    oom = autobatch.Recovery(cfg, env, dist, run_dir, model, tel)

    # Resume: rank 0 picks the newest checkpoint that loads; every rank loads that one.
    step, epoch, batch_in_epoch = 0, 0, 0
    loss_sum, loss_count = torch.zeros((), device=device), 0
    found = None
    if cfg.run.resume != "never":
        path, state, skipped = checkpoint.load_latest(run_dir / "checkpoints") if env.is_main else (None, None, [])
        for reason in skipped:
            tel.event("checkpoint_skipped", reason=reason)
        found = dist.broadcast_train(str(path) if path else None)
        if found and not env.is_main:
            state = checkpoint.load(Path(found))
        if found:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            if len(state["ranks"]) == env.train_world:
                mine = state["ranks"][env.train_rank]
                set_rng_state(mine["rng"])
                loss_sum, loss_count = mine["loss_sum"].to(device), mine["loss_count"]
            else:  # another number of ranks: continue, but per-rank randomness starts afresh
                seed_everything(cfg.run.seed + env.rank + 1000 * step)
                tel.event("resume_world_changed", saved=len(state["ranks"]), now=env.train_world)
            tel.truncate_after(step, wandb_id=state.get("wandb_id"))
            tel.event("resume", step=step, epoch=epoch, checkpoint=Path(found).name,
                      restart_count=env.restart_count)
    if cfg.run.resume == "must" and not found:
        raise ConfigError(f"run.resume=must but {run_dir / 'checkpoints'} holds no loadable checkpoint; "
                          "use run.resume=auto to start fresh")
    if not found:
        seed_everything(cfg.run.seed + env.rank)  # per-rank randomness (dropout, augmentation)
    failed_before = any(e.get("event") == "debug_fail" for e in read_jsonl(run_dir / "events.jsonl"))
    guard = Guard(cfg, dist, tel, failed_before)  # signals -> an agreed stop; debug faults
    guard.log_restart(env.restart_count, step)
    tel.event("start", world=env.world_size, train_world=env.train_world, micro_batch=batch.micro,
              accum=batch.accum, global_batch=global_batch, steps=total, steps_per_epoch=steps_per_epoch,
              precision=precision,
              device=str(device), start_step=step)

    def checkpoint_now() -> None:
        buf = io.BytesIO()  # tensors travel as torch.save bytes: pickling them through gloo fails
        torch.save({"rng": rng_state(), "loss_sum": loss_sum.cpu(), "loss_count": loss_count}, buf)
        ranks = [torch.load(io.BytesIO(b), weights_only=True) for b in dist.all_gather_object(buf.getvalue())]
        error = None
        if env.is_main:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else None,
                     "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "micro_batch": batch.micro,
                     "accum": batch.accum, "train_world": env.train_world, "ranks": ranks, "wandb_id": tel.wandb_id}
            try:
                path = checkpoint.save(run_dir / "checkpoints", step, state, cfg.checkpoint.keep_last,
                                       protect=validation.protected_steps())
                tel.event("checkpoint", step=step, path=path.name)
            except checkpoint.SaveError as e:
                error = e
        # Every rank stops together when rank 0 could not save (disk full, read-only), none hangs in DDP.
        if dist.all_reduce(torch.tensor([float(error is not None)]), "max").item():
            raise error or checkpoint.SaveError(f"training rank 0 could not save the step-{step} checkpoint")

    # Validation: off, inline (blocking baseline) or asynchronous (hand-off to a validator elsewhere).
    validation = for_training(cfg, env, run_dir, job, val_set, model, ema, batch.micro, tel)

    log.info("training %d steps: %d rank(s) x micro-batch %d x accum %d = batch %d, %s on %s",
             total, env.train_world, batch.micro, batch.accum, global_batch, precision, device)
    t_start, t_log, samples_since = time.time(), time.perf_counter(), 0
    stopped_early, stop = False, Stop()
    ddp.train()
    indices = speed.EpochIndices()  # one loader for the run: its workers persist across epochs
    loader = DataLoader(train_set, batch_size=step_batch, sampler=indices, drop_last=True,
                        **speed.loader_options(cfg.data, device))
    while step < total and not stopped_early and not stop:
        sampler.set_epoch(epoch)
        indices.set(list(sampler)[batch_in_epoch * step_batch: steps_per_epoch * step_batch])
        for x, y in loader:
            if cfg.train.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)

            # Forward and backward over the micro-batches. An OOM on any rank, in forward or backward,
            # is agreed on by all; each then redoes this step batch with half the micro-batch.
            while True:
                try:
                    step_loss = torch.zeros((), device=device)
                    xs, ys = x.split(batch.micro), y.split(batch.micro)
                    for i, (xb, yb) in enumerate(zip(xs, ys)):
                        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                        with oom.forward(step), oom.no_sync(ddp, last=i == len(xs) - 1), \
                                autocast(device, precision):
                            loss = job.loss(ddp(xb), yb) * (len(xb) / len(x))
                        with oom.backward(step):
                            scaler.scale(loss).backward()
                        step_loss += loss.detach()
                    break
                except autobatch.StepOOM as e:
                    loss = step_loss = None
                    opt.zero_grad(set_to_none=True)
                    oom.recover(batch, e, step)
            oom.all_reduce_grads()  # with recovery on, gradients are averaged here, after every backward

            # Optimizer step.
            if cfg.train.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            set_momentum(opt, cfg.sched, cfg.optim.momentum, step, warmup)
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            batch_in_epoch += 1
            if ema is not None and step % cfg.ema.every == 0:
                # fp16: the scaler already synchronized, so reading its scale is free; otherwise
                # a device flag on a GPU (no sync in the step).
                skipped = scaler.get_scale() < scale_before if scale_before is not None \
                    else speed.nonfinite(step_loss)
                ema.update(model, skip=skipped)
            loss_sum += step_loss
            loss_count += 1
            samples_since += global_batch

            if step % cfg.train.log_every == 0 or step == total:
                mean_loss = dist.all_reduce(loss_sum / max(loss_count, 1)) / env.train_world
                now = time.perf_counter()
                row = {"step": step, "epoch": epoch, "loss": float(mean_loss), "lr": sched.get_last_lr()[0],
                       "samples_per_s": samples_since / (now - t_log), "time": time.time()}
                if ema is not None:
                    row.update(ema_decay=ema.current_decay, ema_updates=ema.updates, ema_skipped=ema.skipped)
                tel.metrics(row)
                validation.poll()  # new validation results, skipped snapshots, a dead validator
                loss_sum, loss_count, t_log, samples_since = torch.zeros((), device=device), 0, now, 0

            end_of_epoch = batch_in_epoch == steps_per_epoch
            due = (step % cfg.validation.every_steps == 0) if cfg.validation.every_steps else \
                (end_of_epoch and (epoch + 1) % cfg.validation.every_epochs == 0)
            if due or step == total:
                validation.submit(step, epoch)
            if end_of_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            # A stop signal or the validator's early stop: every training rank stops at this same step.
            stop, stopped_early = guard.step_end(step, validation.stop_requested())
            if stopped_early:
                log.info("early stop at step %d", step)
            if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or step == total \
                    or stopped_early or stop:
                checkpoint_now()
            guard.fail_if_due(step)
            if step >= total or stopped_early or stop:
                break

    if stop and step < total:  # preempted: checkpointed, not finished; no summary, exit 128 + signal
        validation.flush()  # snapshots already handed off reach the disk
        guard.exit(stop, step)

    # The end: deployable EMA weights, the summary.
    summary = {"steps": step, "epochs": epoch, "stopped_early": stopped_early, "micro_batch": batch.micro,
               "accum": batch.accum, "global_batch": global_batch, "wall_time_s": round(time.time() - t_start, 2)}
    summary.update(validation.finish(step, epoch))  # drains: the final weights are validated, best is true
    if cfg.validation.weights == "both":  # best and final raw and EMA side by side
        summary.update(best_by_weights(read_jsonl(run_dir / "val" / "results.jsonl"), cfg.validation.metric,
                                       cfg.validation.goal))
    if env.is_main:
        if ema is not None:
            save_weights(run_dir / "ema.safetensors", ema.shadow, {"step": step, "updates": ema.updates})
            summary.update(ema_decay=ema.current_decay, ema_updates=ema.updates, ema_skipped=ema.skipped,
                           ema_tau=ema.tau)
        write_json(run_dir / "summary.json", summary)
        tel.event("end", **summary)
        best = f", best {summary['best_metric']} {summary['best_value']:.4f} at step {summary['best_step']}" \
            if "best_step" in summary else ""
        log.info(f"done: {step} steps in {summary['wall_time_s']:.1f}s{best}; run dir {run_dir}")
    tel.close()
    return summary
