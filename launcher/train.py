"""The training process: `Trainer.build()` wires the run, `run()` is the loop, `finish()` the end.

Each optimizer step consumes one per-rank *step batch* of `batch.step_samples` samples from the
loader and splits it into micro-batches of `micro` (the last one smaller where the cut is uneven).
The effective batch is therefore fixed by the data, not by the micro-batch: changing `micro`
(autobatch, OOM recovery) only changes how the same samples are cut up.

Every collaborator owns its state and its cadence (telemetry decides when to log, validation when
to validate, the checkpointer when to save), and the loop passes the values between them at the
step boundary: the step's agreement (`Agreement.step_end`: stop, early stop, a failed save), the
checkpoint's snapshot of the step (taken once: its weights to the hand-off, the snapshot itself to
the checkpointer's save, with the steps validation protects), and what a restore found (told to
telemetry here). The recurring questions of a run (is it sharded, who keeps the EMA, the validation
mode) are answered once, by the build or the launch's Env.
"""
from __future__ import annotations

import logging
import time
import torch
from torch.utils.data import DataLoader, DistributedSampler

from launcher import jobs
from launcher.batch import probe
from launcher.batch.geometry import share, steps_per_epoch
from launcher.batch.recovery import Headroom, Recovery, StepOOM
from launcher.checkpoint.checkpointer import Checkpointer, Restored, Resumed, TrainState
from launcher.checkpoint.export import save_weights
from launcher.checkpoint.staging import Stage
from launcher.config.schema import Config
from launcher.data import DevicePrefetcher, EpochIndices, train_loader_options
from launcher.distributed import fsdp, wrap
from launcher.distributed.agreement import Agreement
from launcher.distributed.env import Env, layout
from launcher.distributed.groups import Dist
from launcher.distributed.rng import seed_everything
from launcher.distributed.signals import StopFlag, exit_stopped, log_restart
from launcher.distributed.wrap import GradSync
from launcher.ema import EMA, NoEMA, auto_tau
from launcher.faults import Faults
from launcher.optim import Settings, build_optimizer, build_scheduler, warmup_steps
from launcher.precision import GradScaler, resolve_precision
from launcher.rundir import RunDir
from launcher.step import LossMeter, StepParts, forward_backward, optimizer_step
from launcher.summary import whole_run
from launcher.telemetry import Telemetry
from launcher.telemetry.logs import FILE_ONLY
from launcher.telemetry.stalls import Stalls
from launcher.validation.evaluation import Tracker
from launcher.validation.trainer_side import for_training

log = logging.getLogger("launcher.train")


def resumed_from(found: Restored, tel, rundir: RunDir, env: Env, state: TrainState) -> "Resumed | None":
    """The checkpoint a restore resumed from (None: none), and what it found told to telemetry: events, the
    logs truncated to the checkpoint's step, the wandb run adopted."""
    for reason in found.skipped:
        tel.event("checkpoint_skipped", reason=reason)
    resumed = found.resumed
    if resumed is None:
        if found.skipped:  # every checkpoint unreadable: say so, and forget the steps logged before
            log.warning("no checkpoint in %s could be loaded (%s); starting again from step 0", rundir.checkpoints,
                        "; ".join(found.skipped))
            tel.truncate_after(0)
            tel.event("restart_from_scratch", skipped=len(found.skipped))
        return None
    if not resumed.per_rank:  # another number of ranks: per-rank randomness is reseeded (Trainer.build)
        tel.event("resume_world_changed", saved=resumed.saved_world, now=env.train_world)
    tel.truncate_after(resumed.step, wandb_id=resumed.wandb_id)
    tel.event("resume", step=resumed.step, epoch=state.epoch, checkpoint=resumed.checkpoint,
              restart_count=env.restart_count)
    return resumed


class Trainer:
    """One training rank's run. `Trainer(cfg, env, dist, rundir).build().run()` returns the summary."""

    def __init__(self, cfg: Config, env: Env, dist: Dist, rundir: RunDir):
        self.cfg, self.env, self.dist, self.rundir = cfg, env, dist, rundir
        self.device = env.device

    # ------------------------------------------------------------------------------------ build
    def build(self) -> "Trainer":
        """Every collaborator, in the order each needs the ones before it."""
        cfg, env, device = self.cfg, self.env, self.device
        if env.is_main:
            self.rundir.fold_rank_events()  # another rank's OOM restart or give-up, before anything reads them
        self.precision = resolve_precision(cfg.train.precision, device)
        seed_everything(cfg.run.seed)  # identical initial weights on every rank
        self.job = jobs.load(cfg.job)
        model = wrap.prepare(self.job.model().to(device), cfg.train)  # cudnn.benchmark, TF32, channels_last
        group = self.dist.group if self.dist.distributed_training else None
        self.model = wrap.shard(model, cfg.train.strategy, group, device, self.precision, self.job)  # the weights
        self.sharded = fsdp.is_fsdp(self.model)  # every training rank keeps its shards (of the EMA too)
        self.keeps_ema = cfg.ema.enabled and (env.is_main or self.sharded)
        self.train_set, self.val_set = jobs.datasets(self.job)  # the start-up checks built them for a fixed size
        self.staging = Stage(device)  # the checkpoint's snapshots: every training step fences on it
        self.faults = Faults(cfg.debug, env, self.rundir)
        self.faults.arm_forward(self.model)

        # The micro-batch, probed with the real step (and a throwaway optimizer) and agreed by every rank.
        chosen = probe.choose(cfg, env, self.dist, self.rundir, self.model, self.job, self.train_set,
                              self.precision, trial=self._trial)
        batch = chosen.batch
        self.sampler = DistributedSampler(self.train_set, num_replicas=env.train_world, rank=env.train_rank,
                                          shuffle=True, seed=cfg.run.seed, drop_last=True)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), batch)  # batch.size=auto: checked after the probe
        total = self.steps_per_epoch * cfg.train.epochs if cfg.train.epochs else cfg.train.max_steps
        self.total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        self.warmup = warmup_steps(cfg.sched, self.steps_per_epoch)

        opt = build_optimizer(self.model, cfg.optim, device)
        self.parts = StepParts(opt, build_scheduler(opt, cfg.sched, cfg.optim.lr, self.total, self.warmup),
                               GradScaler(device.type, enabled=self.precision == "fp16"),
                               self._ema(self.model, self.total // cfg.ema.every), self.warmup)
        log.info(self.parts.ema.describe(), extra=FILE_ONLY)
        # What the loop calls forward on: DDP around the model (fsdp: the sharded model itself), compiled.
        self.wrapped = wrap.for_loop(self.model, cfg, group, device)
        self.grads = GradSync(self.wrapped)
        self.tel = Telemetry(self.rundir, cfg, env, self.total, enabled=env.is_main)
        self.tel.event("autobatch", **chosen.event)

        self.state, self.meter = TrainState(), LossMeter(device)
        self.stalls = Stalls()  # where the training thread waited, by cause (summary.json's stall_by_cause)
        self.ckpt = Checkpointer(cfg.checkpoint, env, self.dist, self.rundir, self.tel, self.state,
                                 parts={"model": self.model, "optimizer": opt, "scheduler": self.parts.sched,
                                        "scaler": self.parts.scaler, "ema": self.parts.ema},
                                 per_rank={"meter": self.meter}, sharded=self.sharded, stalls=self.stalls,
                                 write_delay_s=cfg.debug.checkpoint_write_delay_s, staging=self.staging)
        self.validation = for_training(cfg, env, self.rundir, self.job, self.val_set, self.model, self.parts.ema,
                                       batch.micro, self.tel, self.stalls, self.sharded)
        # The step's one cross-rank decision, and what each rank brings to it.
        self.stop_flag = StopFlag(cfg.run.stop_signals)
        self.agreement = Agreement(self.dist, env, self.stalls)
        self.agreement.flag("stop", lambda: self.stop_flag.signum)
        self.agreement.flag("early_stop", self.validation.stop_requested)
        self.agreement.flag("save_failed", lambda: self.ckpt.failed() is not None)  # a failed background save
        self.recovery = Recovery(cfg.autobatch, env, self.rundir, self.tel, batch, self.agreement,
                                 Headroom(device, chosen.headroom, env.train_rank, self.faults.low_memory),
                                 record=chosen.record, sharded=self.sharded)
        settings = Settings.of(opt, self.parts.sched)  # the config's: a restore brings back the previous launch's
        resumed = resumed_from(self.ckpt.restore(), self.tel, self.rundir, env, self.state) \
            if cfg.run.resume != "never" else None
        if resumed is not None:
            settings.apply(opt, self.parts.sched)  # a resume that changed optim.* applies it
            log.info("resuming %s from step %d (epoch %d); %d steps left", self.rundir, self.state.step,
                     self.state.epoch, max(0, self.total - self.state.step))
        if resumed is None:
            seed_everything(cfg.run.seed + env.rank)  # per-rank randomness (dropout, augmentation)
        elif not resumed.per_rank:  # another number of ranks: per-rank randomness starts afresh
            seed_everything(cfg.run.seed + env.rank + 1000 * resumed.step)
        if self.recovery.enabled:
            self.faults.arm_oom(self.model, self.state, lambda: self.recovery.phase)
        self.faults.arm_nan(self.model, self.state)
        log_restart(self.dist, self.tel, env.restart_count, self.state.step)
        self.tel.event("start", world=env.world_size, train_world=env.train_world, micro_batch=batch.micro,
                       accum=batch.accum, global_batch=batch.global_size, steps=self.total,
                       steps_per_epoch=self.steps_per_epoch, precision=self.precision, device=str(device),
                       start_step=self.state.step, strategy="fsdp" if self.sharded else "ddp")
        return self

    def _ema(self, model, total_updates: int = 0):
        """This rank's EMA, or NoEMA. ema.tau unset: scaled to the run's length."""
        if not self.keeps_ema:
            return NoEMA()
        tau = self.cfg.ema.tau if self.cfg.ema.tau is not None else auto_tau(total_updates)
        return EMA(model, self.cfg.ema.decay, self.cfg.ema.ramp, tau)

    def _trial(self, n: int, recovery: Recovery) -> None:
        """The batch probe's trial at micro-batch n: two real train steps (the second with the optimizer
        state allocated) with a throwaway optimizer, scheduler, scaler and EMA, on the unwrapped model
        (ddp: each rank alone) or the sharded one (fsdp: every rank in lockstep); on a GPU with the next
        step batch on the device too, as the prefetching loader keeps it."""
        opt = build_optimizer(self.model, self.cfg.optim, self.device)
        parts = StepParts(opt, build_scheduler(opt, self.cfg.sched, self.cfg.optim.lr, 2, 0),
                          GradScaler(self.device.type, enabled=self.precision == "fp16"),
                          self._ema(self.model))
        x, y = probe.probe_batch(self.job, self.train_set, n, self.device)
        global_size = self.cfg.batch.global_size
        ahead = probe.probe_batch(self.job, self.train_set, share(global_size, self.env.train_world) if global_size
                                  else n, self.device) if self.device.type == "cuda" else None  # the prefetched batch
        grads = GradSync(self.model, probe=True)
        for step in range(2):
            self.train_step(x, y, parts, self.model, grads, recovery, step)
        del ahead

    # -------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        """The loop. Returns the summary (rank 0's is complete; other ranks' is the loop's part). However
        training ends (the end, a stop, exit 75, an error), the save in flight finishes first (bounded)."""
        try:
            return self._loop()
        finally:
            self.ckpt.close()

    def _loop(self) -> dict:
        cfg, state, batch = self.cfg, self.state, self.recovery.batch
        log.info("training %d steps on %s: %s, %s on %s", self.total, layout(self.env, self.sharded),
                 batch.describe(), self.precision, self.device)
        state.started, agreed, final = time.time(), None, False  # wall_time_s counts training, not set-up
        step_samples = batch.step_samples
        indices = EpochIndices()  # one loader for the run: its workers persist across epochs
        loader = DataLoader(self.train_set, batch_size=step_samples, sampler=indices, drop_last=True,
                            **train_loader_options(cfg.data, self.device))
        batches = DevicePrefetcher(loader, self.device, cfg.train.channels_last)
        self.wrapped.train()
        while state.step < self.total and not final:
            self.sampler.set_epoch(state.epoch)
            indices.set(list(self.sampler)[state.batch_in_epoch * step_samples: self.steps_per_epoch * step_samples])
            for x, y in batches:  # on the device already: each copied ahead, on a side stream (a GPU)
                loss = self._step(x, y)
                state.step += 1
                state.batch_in_epoch += 1
                self.meter.add(loss, self.recovery.batch.global_size)
                self.ckpt.prepare()  # the snapshot's buffers, in the background, once the optimizer's state exists

                last = state.step == self.total
                if self.tel.should_log(state.step, last):
                    with self.stalls.measure("logging"):
                        self.tel.metrics({"step": state.step, "epoch": state.epoch,
                                          **self.meter.take(self.dist, self.env.train_world),
                                          "lr": self.parts.sched.get_last_lr()[0], "time": time.time(),
                                          **self.parts.ema.stats()})
                        self.validation.poll()  # new validation results, skipped snapshots, a dead validator
                end_of_epoch = state.batch_in_epoch == self.steps_per_epoch
                validating = self.validation.due(state.step, state.epoch, end_of_epoch, last)  # every rank
                snap = self.ckpt.snapshot() if validating else None  # the step's one copy: every validation step saves
                if validating:
                    with self.stalls.measure(self.validation.stall):
                        self.validation.submit(state.step, state.epoch, snap)  # a hand-off sends snap's weights
                if end_of_epoch:
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                # The step's one decision, on every training rank alike: a stop signal, the validator's early
                # stop, a failed background save (SaveError on every rank).
                agreed = self.agreement.step_end(again=validating)
                self.ckpt.stop_if_failed(agreed.save_failed)
                if agreed.early_stop:
                    log.info("early stop at step %d", state.step)
                final = last or agreed.early_stop or bool(agreed.stop)  # its save is waited for
                if snap is not None or final or self.ckpt.due(state.step):
                    self.ckpt.save(snap or self.ckpt.snapshot(), protect=self.validation.protected_steps(), final=final)
                self.faults.step_end(state.step, self.tel, self.dist, settle=self.ckpt.wait)
                if final:
                    break
        if agreed is not None and agreed.stop and state.step < self.total:  # preempted: checkpointed, not finished
            self.validation.flush()  # snapshots already handed off reach the disk
            exit_stopped(self.tel, self.stop_flag, agreed.stop, state.step)  # exit 128 + signal
        return self.finish(agreed is not None and agreed.early_stop)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, parts: StepParts, wrapped, grads: GradSync,
                   recovery: Recovery, step: int) -> torch.Tensor:
        """One optimizer step, as training and the batch probe's trial run it: forward and backward over the
        micro-batches (an OOM before the last backward is agreed on by every rank: StepOOM), the wait for the
        last snapshot's copy out of the state, the optimizer step, then the EMA unless the step must not
        count (see step.optimizer_step)."""
        loss = forward_backward(x, y, recovery, grads, wrapped, self.job, parts.scaler, self.device, self.precision,
                                step)
        self.staging.fence()  # before the state moves (even in a step the GradScaler skips): a wait on the device
        gate = self.keeps_ema and (step + 1) % self.cfg.ema.every == 0
        skip = optimizer_step(self.model, parts, self.cfg, step, gate)
        if gate:
            parts.ema.update(self.model, skip=skip)
        return loss

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loop's step: an OOM agreed on by every rank redoes it with half the micro-batch."""
        while True:
            try:
                return self.train_step(x, y, self.parts, self.wrapped, self.grads, self.recovery, self.state.step)
            except StepOOM as e:
                self.parts.opt.zero_grad(set_to_none=True)
                self.recovery.recover(e, self.state.step, self.grads)

    # ----------------------------------------------------------------------------------- finish
    def finish(self, early: bool) -> dict:
        """Deployable EMA weights, the final validation, retention, the summary."""
        cfg, env, state, ema = self.cfg, self.env, self.state, self.parts.ema
        batch = self.recovery.batch
        summary = {"steps": state.step, "epochs": state.epoch, "stopped_early": early, "micro_batch": batch.micro,
                   "accum": batch.accum, "global_batch": batch.global_size,
                   "wall_time_s": round(state.wall_time_s, 2),
                   "stall_by_cause": self.stalls.summary(time.time() - state.started)}  # this launch's waits
        final_ema = fsdp.full_state(ema.shadow, keep=env.is_main)  # fsdp: every training rank gathers
        summary.update(self.validation.finish(state.step, state.epoch, self.ckpt.snapshot()))  # the final weights
        self.ckpt.retain(self.validation.protected_steps())  # retention again: the true best, the unvalidated
        if cfg.validation.weights == "both":  # best and final raw and EMA side by side, by the validation's rule
            summary.update(Tracker(self.rundir, cfg).by_weights())
        if env.is_main:
            if self.keeps_ema:
                save_weights(self.rundir.ema_weights, final_ema, {"step": state.step, "updates": ema.updates})
                summary.update(ema.stats(), ema_tau=ema.tau)
            summary = whole_run(self.rundir, summary)  # the whole run, every launch
            self.rundir.write_summary(summary)
            self.tel.event("end", **summary)
            best = f", best {summary['best_metric']} {summary['best_value']:.4f} at step {summary['best_step']}" \
                if "best_step" in summary else ""
            log.info(f"done: {state.step} steps in {summary['wall_time_s']:.1f}s{best}; run dir {self.rundir}")
        self.tel.close()
        return summary

