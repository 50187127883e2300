"""PyTorch Lightning 2.x: a LightningModule with the recipe's model, optimizer and per-step schedule;
Lightning's own weight-averaging callback (`WeightAveraging`: it keeps the average, swaps it in for
validation and saves it in checkpoints) with the recipe's EMA ramp as its averaging function; validation
every epoch in the fit loop; ModelCheckpoint on the validation metric (the best kept), Lightning's default
one (the latest, at every validation) and one every `ckpt_every` steps: the launcher's cadence.

    python benchmarks/peers/lightning_task.py --recipe R.json --out M.json        # one process
    torchrun --nproc_per_node=N benchmarks/peers/lightning_task.py ...            # DDP: Lightning reads torchrun's env

Lightning's stock `EMAWeightAveraging` has a fixed decay; a fixed 0.9999 over a few thousand steps would
average the early, untrained weights, so the ramp is passed in. Progress bar and model summary are off
(the launcher prints plain lines); its CSVLogger logs every `log_every` steps, as the launcher does.
"""
import torch

import recipe

r = recipe.load()
recipe.importable_torchvision()  # Lightning imports torchmetrics, which imports torchvision
import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, WeightAveraging  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

world_size, rank, local_rank = recipe.world()
dev = recipe.device(r, local_rank)
rec = recipe.Recorder(r, "lightning", dev, rank)


class Task(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.job = recipe.make_job(r)
        self.model = self.job.model()
        self.train_set, self.val_set = self.job.datasets()
        self.sums = {}

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.job.loss(self(x), y)
        self.log("loss", loss)
        return loss

    def on_validation_epoch_start(self):
        self.sums = {}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        for k, v in {**self.job.metrics(self(x), y), "n": torch.tensor(float(len(x)), device=x.device)}.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()

    def on_validation_epoch_end(self):
        sums = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self.sums.items()}
        n = sums.pop("n")
        metrics = {k: float(v / n) for k, v in sums.items()}
        self.log(f"val_{r.metric}", metrics[r.metric])
        if not self.trainer.sanity_checking:
            rec.result(self.trainer.global_step, metrics)

    def configure_optimizers(self):
        opt = recipe.optimizer(self.model, r, self.device)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": recipe.schedule(opt, r), "interval": "step"}}

    def train_dataloader(self):
        return recipe.loader(self.train_set, r.batch, True, r, dev=dev)  # Lightning adds the DistributedSampler

    def val_dataloader(self):
        return recipe.loader(self.val_set, r.val_batch, False, r, dev=dev)


class RampedEMA(WeightAveraging):
    """Lightning's weight averaging, updated after every optimizer step with the recipe's ramp: its
    first update copies the weights (AveragedModel's rule), the n-th lerps with 1 - ema_decay(n)."""

    def __init__(self):
        super().__init__(multi_avg_fn=self.lerp)
        self.n = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.n = trainer.global_step  # the step count on the host: no read of AveragedModel's device counter
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def lerp(self, averaged, current, _num_averaged):
        """One fused update per device and dtype group; integer buffers are copied."""
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - recipe.ema_decay(self.n, r))
        else:
            torch._foreach_copy_(averaged, current)


class Timing(Callback):
    """The Recorder's marks and validation spans (the sanity check before training is not counted)."""

    def on_train_start(self, trainer, pl_module):
        rec.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec.step(trainer.global_step)

    def on_validation_start(self, trainer, pl_module):
        self.span = None if trainer.sanity_checking else rec.validation(trainer.global_step)

    def on_validation_end(self, trainer, pl_module):
        if self.span is not None:
            self.span.stop()


class TimedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint, timed where it writes a file."""

    def _save_checkpoint(self, trainer, filepath):
        with rec.checkpoint(trainer.global_step):
            super()._save_checkpoint(trainer, filepath)


L.seed_everything(r.seed, verbose=False)
task = Task()
ckpt_dir = f"{r.run_dir}/checkpoints"
callbacks = [RampedEMA(), Timing(), TimedCheckpoint(dirpath=ckpt_dir, filename="latest-{step}"),
             TimedCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor=f"val_{r.metric}", mode=r.goal)]
if r.ckpt_every:
    callbacks.append(TimedCheckpoint(dirpath=ckpt_dir, every_n_train_steps=r.ckpt_every, filename="step-{step}"))
trainer = L.Trainer(accelerator="gpu" if dev.type == "cuda" else "cpu", devices=world_size,
                    strategy="ddp" if world_size > 1 else "auto",
                    precision="bf16-mixed" if r.precision == "bf16" else "32-true", max_epochs=r.epochs,
                    logger=CSVLogger(r.run_dir), log_every_n_steps=r.log_every, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=r.run_dir, benchmark=dev.type == "cuda",
                    callbacks=callbacks)
trainer.fit(task)
rec.write(world=world_size)
