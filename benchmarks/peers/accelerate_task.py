"""HF Accelerate: the usual hand-written loop under `accelerate launch`, timm's EMA, validation of the EMA
at the end of every epoch, and `save_state` at every validation and every `ckpt_every` steps (the last
`keep_last` kept; the EMA weights saved again when the metric improves).

    accelerate launch --num_processes 1 --cpu benchmarks/peers/accelerate_task.py --recipe R.json --out M.json
    accelerate launch --num_processes N [--multi_gpu] --mixed_precision bf16 benchmarks/peers/accelerate_task.py ...
    torchrun --nproc_per_node=N benchmarks/peers/accelerate_task.py ...   # several CPU processes (no mpirun)

The scheduler is registered for checkpointing rather than prepared: a prepared scheduler steps once per
process on every call, which would run the recipe's schedule N times too fast.
"""
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

import recipe

r = recipe.load()
accelerator = Accelerator(
    cpu=r.device != "cuda", mixed_precision="bf16" if r.precision == "bf16" else "no",
    project_config=ProjectConfiguration(project_dir=r.run_dir, automatic_checkpoint_naming=True,
                                        total_limit=r.keep_last))
dev = recipe.device(r, accelerator.local_process_index)
recipe.importable_torchvision()
set_seed(r.seed)
job = recipe.make_job(r)
model = job.model().to(accelerator.device)  # before the optimizer: fused AdamW wants its parameters there
opt = recipe.optimizer(model, r, dev)
sched = recipe.schedule(opt, r)
train_set, val_set = job.datasets()
train = recipe.loader(train_set, r.batch, True, r, dev=dev)  # prepare() shards them over the processes
val = recipe.loader(val_set, r.val_batch, False, r, dev=dev)
model, opt, train, val = accelerator.prepare(model, opt, train, val)
ema = recipe.timm_ema(accelerator.unwrap_model(model), r)
accelerator.register_for_checkpointing(sched, ema)
best_dir = Path(r.run_dir) / "best"


def checkpoint(step: int, best: bool = False) -> None:
    with rec.checkpoint(step):
        accelerator.save_state()
        if best:
            accelerator.save_model(ema.module, best_dir)


rec = recipe.Recorder(r, "accelerate", accelerator.device, accelerator.process_index)
step = 0
for epoch in range(r.epochs):
    model.train()
    for x, y in train:
        loss = job.loss(model(x), y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        ema.update(accelerator.unwrap_model(model), step=step)
        rec.step(step)
        if r.ckpt_every and step % r.ckpt_every == 0 and step % r.steps_per_epoch:
            checkpoint(step)
    with rec.validation(step):
        rec.result(step, recipe.evaluate(ema.module, val, job, accelerator.device, r.precision,
                                         lambda t: accelerator.reduce(t, "sum")))
    checkpoint(step, best=rec.best_improved())
rec.write(world=accelerator.num_processes)
accelerator.end_training()
