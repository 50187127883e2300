"""FSDP2 (`train.strategy=fsdp`): shard the model over the training group with `fully_shard`.

Each *block* gets its own `fully_shard` (its parameters are all-gathered just before its forward
and resharded after it), then the root (whatever no block holds). Which modules are blocks:

* the job's `shard_blocks` (class names, e.g. `("TransformerBlock",)`): every outermost module of
  those classes;
* otherwise the automatic rule: the children that hold parameters of the outermost
  `nn.ModuleList` / `nn.Sequential` containers (a transformer's `blocks`, a CNN's stages, an
  MLP's layers). A model without such a container is sharded as one unit (the root).

The mesh is built over the *training* process group (the validator rank is not in it). Mixed
precision follows `train.precision`: bf16/fp16 compute in that dtype with fp32 master weights
and fp32 gradient reduction; fp32 computes in fp32. BatchNorm layers are the exception: a
low-precision policy would cast their weights but not their running statistics, which batch_norm
refuses ("expected scalar type BFloat16 but found Float"); each block's BatchNorm layers are
therefore sharded first, together, with no casting (fp32, as under ddp with autocast). Every parameter is sharded along dim 0
(torch.chunk over the ranks; see shards.py); buffers stay replicated plain tensors. With one
training process there is nothing to shard: the model is trained as is.

The step: with runtime OOM recovery on (autobatch.max_retries > 0, the default) every rank
gathers all blocks before the step's first forward and keeps them until the last backward
(`unshard_for_step`), so, as under ddp, nothing before the last backward runs a collective and an
OOM there is agreed on and redone in place (batch/recovery.py). Parameters in the compute dtype are then
whole during the step (like reshard_after_forward=False); master weights, gradients, optimizer
state and EMA stay sharded. With autobatch.max_retries=0, FSDP's own step: each block gathered
for its forward and backward, resharded after each (the least memory). Accumulation never
reduce-scatters nor reshards between micro-batches (`accumulate`).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


# The FSDP2 API this module calls: public in torch.distributed.fsdp since torch 2.6. FSDPModule.reset_iter_state
# (torch 2.13) is optional: see `reset_step` and `can_reset`.
API = ("fully_shard", "MixedPrecisionPolicy", "FSDPModule.unshard", "FSDPModule.reshard",
       "FSDPModule.set_requires_gradient_sync", "FSDPModule.set_reshard_after_forward",
       "FSDPModule.set_reshard_after_backward")


def api_missing() -> List[str]:
    """The names of API that this torch lacks (empty where fsdp works): checked before a run starts."""
    try:
        import torch.distributed.fsdp as fsdp_api
    except ImportError:
        return ["torch.distributed.fsdp"]
    missing = []
    for name in API:
        obj = fsdp_api
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(f"torch.distributed.fsdp.{name}")
    return missing


def blocks(model: nn.Module, names: Sequence[str] = ()) -> List[nn.Module]:
    """The modules that get their own fully_shard, outermost first (see the module's docstring)."""
    out: List[nn.Module] = []

    def has_params(m: nn.Module) -> bool:
        return any(True for _ in m.parameters())

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if names:
                if type(child).__name__ in names:
                    out.append(child)
                else:
                    walk(child)
            elif isinstance(child, (nn.ModuleList, nn.Sequential)):
                out.extend(c for c in child.children() if has_params(c))
            else:
                walk(child)

    if not names and isinstance(model, (nn.ModuleList, nn.Sequential)):
        return [c for c in model.children() if has_params(c)]
    walk(model)
    if names and not out:
        raise ValueError(f"the job's shard_blocks {tuple(names)} name no module of {type(model).__name__}")
    return out


def mesh(group, device: torch.device):
    """A 1-D DeviceMesh over `group` (the training ranks only)."""
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh.from_group(group, device.type)


def policy(precision: str):
    """The MixedPrecisionPolicy for `train.precision` (resolved: fp32, bf16 or fp16)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


BATCH_NORM = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm


def batch_norms(module: nn.Module) -> List[nn.Module]:
    """The BatchNorm layers inside `module` not yet sharded (not in an inner block): their running
    statistics stay fp32 whatever the policy, so they get an fp32 policy of their own (see `shard`)."""
    from torch.distributed.fsdp import FSDPModule
    out, skip = [], set()
    for m in module.modules():
        if isinstance(m, FSDPModule):
            skip.update(id(x) for x in m.modules())
        elif isinstance(m, BATCH_NORM) and id(m) not in skip and m is not module:
            out.append(m)
    return out


def shard(model: nn.Module, group, device: torch.device, precision: str, job=None) -> nn.Module:
    """`model` sharded in place over `group` (its class becomes an FSDPModule); `model` unchanged
    when `group` is None (one training process). Under a low-precision policy each unit's BatchNorm
    layers are sharded first, as one group (one all-gather) with no casting."""
    if group is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    m, mp = mesh(group, device), policy(precision)
    found = blocks(model, tuple(getattr(job, "shard_blocks", ()) or ()))
    fp32 = MixedPrecisionPolicy()
    for unit in [*found, model]:
        norms = batch_norms(unit) if mp.param_dtype is not None else []
        if norms:
            fully_shard(norms, mesh=m, mp_policy=fp32)
        fully_shard(unit, mesh=m, mp_policy=fp32 if isinstance(unit, BATCH_NORM) else mp)
    log.info("fsdp: %d block(s) + root sharded over %d training ranks, %s", len(found), m.size(), precision)
    return model


def accumulate(model: nn.Module, sync: bool) -> None:
    """For the next micro-batch's backward: reduce-scatter the gradients (and reshard) only in the last
    one; before it they accumulate unsharded, without collectives."""
    model.set_requires_gradient_sync(sync)
    model.set_reshard_after_backward(sync)


def unshard_for_step(model: nn.Module) -> None:
    """Before a step's first forward, on every training rank (runtime OOM recovery): all-gather every
    block now and keep it unsharded until the last backward reshards it, so that no forward and no
    backward before the last runs a collective: an OOM there stays on its rank and is agreed on as
    under ddp (batch/recovery.py). The price: the full parameters (in the compute dtype) live through the step,
    as with reshard_after_forward=False; optimizer state, gradients, master weights and EMA stay sharded."""
    from torch.distributed.fsdp import FSDPModule
    model.set_reshard_after_forward(False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.unshard()


def default_resharding(model: nn.Module) -> None:
    """FSDP's own choice again after `unshard_for_step` (the batch probe): blocks reshard after their
    forward, the root (whose backward comes first) does not."""
    model.set_reshard_after_forward(True)
    model.set_reshard_after_forward(False, recurse=False)


def can_reset(model: nn.Module) -> bool:
    """Whether this torch can recover a step aborted mid-way in place (`FSDPModule.reset_iter_state`,
    torch 2.13); without it a mid-step OOM under fsdp restarts instead (batch/recovery.py: exit 75)."""
    return callable(getattr(model, "reset_iter_state", None))


def reset_step(model: nn.Module) -> None:
    """After an OOM agreed on mid-step (every rank calls it), or after the batch probe's trial step:
    FSDP's own recovery (`reset_iter_state`: reshard, forget the aborted forward's prefetch order,
    which would otherwise make the ranks' next backwards gather different modules; on a torch without
    it, a plain reshard, enough after a complete step), then drop the gradients accumulated unsharded
    so far (outside `p.grad` of the sharded parameters, so `zero_grad` misses them; no public call for
    this: FSDPParam's fields, torch 2.13), so the redo starts from zero."""
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if can_reset(model):
        model.reset_iter_state()
    else:
        for m in modules:
            m.reshard()
    for m in modules:
        group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
        for p in getattr(group, "fsdp_params", ()):
            p.unsharded_accumulated_grad = None
            if hasattr(p, "_unsharded_param"):
                p._unsharded_param.grad = None


def is_fsdp(model: nn.Module) -> bool:
    """Whether `model` was sharded by `shard` (fsdp with 2+ training ranks): the one answer to "is this
    run sharded?" that the hand-off, checkpoints and the EMA follow."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def stand_in_grads(model: nn.Module) -> None:
    """The batch probe's trial skips the reduce-scatter (nothing collective between its agreements):
    zero gradients in their place, so the optimizer step still allocates its sharded state."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def full_state(state: Dict[str, torch.Tensor], keep: bool = True) -> Dict[str, torch.Tensor]:
    """Full tensors of a (possibly sharded) state, on the host: DTensor.full_tensor(), a collective that
    every training rank must call in the same key order, one tensor at a time (the device holds one
    full tensor at most). `keep=False`: take part in the gathers, keep nothing (ranks that do not write)."""
    from torch.distributed.tensor import DTensor
    out = {}
    for k, v in state.items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = full.detach().cpu()
    return out
