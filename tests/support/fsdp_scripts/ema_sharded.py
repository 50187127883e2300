"""Run under torchrun (gloo): the sharded EMA against a plain one on an unsharded copy of the model.

Every rank trains the same batch, so the averaged gradients equal the plain model's. Writes
what tests/distributed/test_fsdp.py checks as JSON to argv[1] (rank 0).
"""
import io
import json
import sys

import torch
import torch.distributed as dist
import torch.distributed.tensor  # noqa: F401 - torch.load(weights_only=True) of DTensors needs it

from launcher.distributed.groups import destroy_together
from launcher.distributed import fsdp
from launcher.ema import EMA
from launcher.jobs.mnist1d import CNN
from launcher.distributed.shards import local_and_layout

dist.init_process_group("gloo")
# argv[2] == "validator": the last rank stands for the validator, outside the training group (as in training).
validator = len(sys.argv) > 2 and sys.argv[2] == "validator"
group = dist.new_group(list(range(dist.get_world_size() - 1))) if validator else dist.group.WORLD
if validator and dist.get_rank() == dist.get_world_size() - 1:  # waits for the others, then leaves with them
    group = None  # no reference outlives the destroy
    destroy_together()
    sys.exit(0)
rank, world = dist.get_rank(), dist.get_world_size(group)
torch.manual_seed(0)
ref = CNN(channels=25)
model = CNN(channels=25)
model.load_state_dict(ref.state_dict())
fsdp.shard(model, group, torch.device("cpu"), "fp32")
ema_ref, ema = EMA(ref, 0.9, "none"), EMA(model, 0.9, "none")
opt_ref, opt = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(16, 40, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
for _ in range(3):
    for m, o, e in ((ref, opt_ref, ema_ref), (model, opt, ema)):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()
        o.zero_grad()
        e.update(m)

per_rank = [None] * world
dist.all_gather_object(per_rank, ema.nbytes(), group=group)
out = {"world": world, "nbytes": per_rank, "nbytes_ref": ema_ref.nbytes(), "updates": ema.updates}
full = fsdp.full_state(ema.shadow)  # a collective: every rank
out["ema_err"] = max((full[k] - ema_ref.shadow[k]).abs().max().item() for k in full)
flats = [g.flat for g in ema._groups]
out["sharded"] = sorted(k for k, v in ema.shadow.items() if local_and_layout(v)[1] is not None)
out["aliases"] = all(any(f.untyped_storage().data_ptr() == local_and_layout(v)[0].untyped_storage().data_ptr()
                         for f in flats) for v in ema.shadow.values())

buf = io.BytesIO()  # the state dict pickles (DTensors included) and loads back with weights_only
torch.save(ema.state_dict(), buf)
saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
fresh = EMA(model, 0.9, "none")
fresh.load_state_dict(saved)  # DTensors of this layout
out["load_dtensor_err"] = max((fresh.shadow[k].full_tensor() - full[k]).abs().max().item() for k in full)
fresh = EMA(model, 0.9, "none")
fresh.load_state_dict(ema_ref.state_dict())  # full plain tensors (a ddp checkpoint)
out["load_full_err"] = max((local_and_layout(fresh.shadow[k])[0] - local_and_layout(ema.shadow[k])[0]).abs().max().item()
                           for k in full)
out["load_updates"] = fresh.updates

ema.copy_to(model)  # the sharded model now holds the average
weights = fsdp.full_state(model.state_dict())
out["copy_to_err"] = max((weights[k] - ema_ref.shadow[k]).abs().max().item() for k in weights)
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
del model, ref, ema, ema_ref, fresh, opt, opt_ref, weights, full, saved  # no sharded tensor outlives the group
group = None  # no reference outlives the destroy
destroy_together()  # every rank (the stand-in validator included) leaves together
