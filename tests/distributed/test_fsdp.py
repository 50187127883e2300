"""train.strategy=fsdp (FSDP2): the same training as ddp, with weights, gradients, optimizer state and
the EMA sharded over the training ranks. Real torchrun with gloo on CPU."""
import json
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, ROOT, child_env, command, launch

QUICK = [*FAST, "validation.mode=off", "checkpoint.every_steps=0", "train.log_every=1", "train.max_steps=6"]


def test_a_bad_strategy_exits_2_with_one_clear_line(tmp_path):
    proc = launch(["train", *QUICK, "train.strategy=zero3", f"run.dir={tmp_path}/run"], check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "train.strategy" in lines[0] and "ddp" in lines[0] and "fsdp" in lines[0]


def test_blocks_the_automatic_rule_and_the_jobs_own_classes():
    from torch import nn

    from launcher.distributed.fsdp import blocks
    from launcher.jobs.mnist1d import CNN, MLP

    mlp, cnn = MLP(hidden=8), CNN(channels=4)
    assert blocks(mlp) == [mlp.net[0], mlp.net[2], mlp.net[4]]  # the layers of the Sequential holding parameters
    assert blocks(cnn) == [cnn.net[0], cnn.net[2], cnn.net[4]]  # the head is the root's

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.blocks, self.head = nn.Linear(4, 4), nn.ModuleList([Block(), Block()]), nn.Linear(4, 2)

    net = Net()
    assert blocks(net) == list(net.blocks)  # outermost containers only: not each Block's inner Sequential
    assert blocks(net, ("Block",)) == list(net.blocks)
    assert blocks(net, ("Linear",)) == [net.embed, *(b.mlp[i] for b in net.blocks for i in (0, 2)), net.head]
    with pytest.raises(ValueError, match="name no module"):
        blocks(net, ("Missing",))


@pytest.mark.parametrize("bad,named", [("train.compile=true", "train.compile"),
                                       ("train.precision=fp16", "train.precision=fp16")])
def test_what_fsdp_does_not_support_is_refused_before_anything_runs(tmp_path, bad, named):
    proc = launch(["train", *QUICK, "train.strategy=fsdp", bad, f"run.dir={tmp_path}/run"], check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and named in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_inline_validation_with_fsdp_on_two_processes_is_refused():
    from launcher.config.checks import check
    from launcher.config.schema import Config
    from launcher.errors import ConfigError

    cfg = Config()
    cfg.train.strategy, cfg.validation.mode = "fsdp", "inline"
    check(cfg, world_size=1)  # one process: nothing is sharded
    with pytest.raises(ConfigError, match="validation.mode=inline"):
        check(cfg, world_size=2)


@pytest.mark.parametrize("nproc,validator", [(2, False), (3, True)])  # 3 training ranks: below
@pytest.mark.slow
def test_the_sharded_ema_matches_a_plain_one_with_1_over_n_of_its_memory(tmp_path, nproc, validator):
    """Unit level, under torchrun: update, memory per rank, aliasing of the flat buffers, state_dict round
    trip (DTensors and full plain tensors), copy_to into the sharded model. `validator`: the last rank
    stays out of the training group, and the mesh spans the training ranks only."""
    out = tmp_path / "out.json"
    script = str(ROOT / "tests" / "support" / "fsdp_scripts" / "ema_sharded.py")
    proc = subprocess.run(command([], nproc)[:5] + [script, str(out), "validator" if validator else "all"],
                          env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    nproc -= validator
    assert r["world"] == nproc and r["updates"] == 3 and r["load_updates"] == 3
    assert sum(r["nbytes"]) == r["nbytes_ref"]  # every row once, no padding kept
    assert max(r["nbytes"]) <= r["nbytes_ref"] / nproc * 1.25  # ~1/N per rank (dim-0 chunks round up)
    assert r["aliases"] and "net.0.weight" in r["sharded"]
    for k in ("ema_err", "load_dtensor_err", "load_full_err", "copy_to_err"):
        assert r[k] < 1e-6, (k, r[k])


def _run(tmp_path, name, nproc, strategy, extra):
    run = tmp_path / name
    launch(["train", *QUICK, f"train.strategy={strategy}", f"run.dir={run}", *extra], nproc=nproc, timeout=240)
    return run


def _ema_mb(run, rank):
    return float(re.search(r"EMA kept on this rank: \d+ tensors.*?, ([\d.]+) MB",
                           (run / "logs" / f"rank-{rank}.log").read_text()).group(1))


@pytest.mark.slow
# Kept to two launches of each strategy for CI's time: 3 ranks (uneven shards) with recovery's step, the
# EMA compared; 2 ranks with FSDP's own step (retries=0), the final weights compared.
@pytest.mark.parametrize("nproc,ema,retries", [(3, "average", 3), (2, "raw", 0)])
def test_fsdp_and_ddp_give_the_same_weights_and_ema(tmp_path, nproc, ema, retries):
    """Same seed, same steps, accumulation (2 micro-batches) and active gradient clipping: the exported EMA
    and every step's loss agree to 1e-5. `raw`: an EMA whose decay stays ~0 (tau 1e9) is the final weights.
    retries=0: no OOM recovery, so fsdp runs its own step (blocks resharded after forward)."""
    extra = [f"batch.global_size={64 * nproc}", "batch.size=32", "train.grad_clip=0.5", "job.hidden=64",
             f"autobatch.max_retries={retries}"]
    extra += ["ema.decay=0.9", "ema.ramp=none"] if ema == "average" else ["ema.ramp=exp", "ema.tau=1e9"]
    ddp, fsdp = _run(tmp_path, "ddp", nproc, "ddp", extra), _run(tmp_path, "fsdp", nproc, "fsdp", extra)
    a, b = load_file(str(ddp / "ema.safetensors")), load_file(str(fsdp / "ema.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    la = [r["loss"] for r in map(json.loads, (ddp / "metrics.jsonl").read_text().splitlines())]
    lb = [r["loss"] for r in map(json.loads, (fsdp / "metrics.jsonl").read_text().splitlines())]
    assert len(la) == len(lb) == 6
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-5)
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["ema_updates"] == 6 and summary["accum"] == 2
    # ddp: rank 0 alone keeps the whole EMA; fsdp: every training rank keeps ~1/N of it.
    full, shards = _ema_mb(ddp, 0), [_ema_mb(fsdp, r) for r in range(nproc)]
    assert "EMA: none on this rank" in (ddp / "logs" / "rank-1.log").read_text()
    assert all(s <= full / nproc * 1.25 for s in shards) and abs(sum(shards) - full) <= 1e-4 * nproc


@pytest.mark.slow
def test_a_nan_loss_on_rank_1_is_skipped_by_every_ranks_ema_shards(run_dir):
    """The EMA gate reads the global norm of the sharded gradients (one all-reduce that every rank runs),
    so all ranks skip the same step: the gathered EMA has no NaN (rank 1's shards skipped too)."""
    launch(["train", *QUICK, "train.strategy=fsdp", "train.max_steps=4", "debug.nan_loss_at_step=4",
            "debug.nan_loss_rank=1", f"run.dir={run_dir}"], nproc=2, timeout=240)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ema_skipped"] == 1 and summary["ema_updates"] == 3
    ema = load_file(str(run_dir / "ema.safetensors"))
    assert all(torch.isfinite(v).all() for v in ema.values() if v.is_floating_point())


def test_fsdp_with_one_training_process_trains_the_model_as_is(run_dir):
    """Nothing to shard with one training rank: it runs, says so nowhere as sharded, exports the EMA."""
    launch(["train", *QUICK, "train.strategy=fsdp", f"run.dir={run_dir}"], timeout=180)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    assert "fsdp:" not in (run_dir / "logs" / "rank-0.log").read_text()
    assert load_file(str(run_dir / "ema.safetensors"))
