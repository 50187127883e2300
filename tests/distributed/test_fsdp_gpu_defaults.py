"""train.strategy=fsdp with what a GPU run uses by default: the EMA's device gate, bf16 with BatchNorm,
fused optimizers; and what fsdp refuses up front. Real torchrun (gloo) on the CPU."""
import json
import subprocess

import pytest

from conftest import FAST, ROOT, child_env, command, launch, read_jsonl

NOT_MNIST = [a for a in FAST if not a.startswith("job.")]
TINY_RESNET = ["job=synthetic", "job.width=4", "job.depth=[1,1]", "job.image_size=16", "job.num_classes=10",
               "job.train_samples=128", "job.val_samples=32", "batch.size=8"]


@pytest.mark.slow
def test_the_device_gate_bf16_batchnorm_and_sgd_on_a_real_fsdp_group(tmp_path):
    """Under fsdp the gradient norm is a DTensor: the flag the step hands the EMA is a plain tensor that
    the device gate (the GPU path, run here on the CPU) takes; a NaN in one rank's shard makes every rank
    skip, with the average's bits kept; kept steps are bit-identical to the host path. A BatchNorm ResNet
    trains under the bf16 policy (its norms stay fp32), and SGD on sharded parameters is not fused."""
    out = tmp_path / "out.json"
    script = str(ROOT / "tests" / "support" / "fsdp_scripts" / "gpu_defaults.py")
    proc = subprocess.run(command([], 2)[:5] + [script, str(out)], env=child_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in json.loads(out.read_text()):
        for name in ("gate", "gate_clipped"):  # without and with train.grad_clip (clip_grad_norm_'s DTensor norm)
            g = rank[name]
            assert "error" not in g, g
            assert g["types"] == ["Tensor"] and g["flags"] == [False, False, True]
            assert all(g["bit_equal"]) and g["skipped_kept_bits"]
            assert g["updates"] == [2, 2] and g["skipped"] == [1, 1]
        assert rank["bn_bf16"] == {"ok": True, "loss_finite": True, "bn_dtypes": ["torch.float32"]}, rank["bn_bf16"]
        assert rank["sgd"] == {"fused": False, "ok": True}, rank["sgd"]


@pytest.mark.slow
def test_fsdp_trains_and_validates_a_batchnorm_resnet_at_bf16(tmp_path):
    """The GPU default precision with job=synthetic's ResNet (BatchNorm): 2 training ranks, the EMA, sharded
    hand-offs validated by the validator process, sharded checkpoints."""
    run = tmp_path / "run"
    launch(["train", *NOT_MNIST, *TINY_RESNET, "train.max_steps=4", "train.precision=bf16", "train.strategy=fsdp",
            "validation.mode=process", "validation.every_steps=2", "validation.policy=all", f"run.dir={run}"],
           nproc=2, timeout=240)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["ema_updates"] == 4 and summary["unvalidated_steps"] == []
    assert [r["step"] for r in read_jsonl(run / "val" / "results.jsonl")] == [2, 4]
    start = next(e for e in read_jsonl(run / "events.jsonl") if e["event"] == "start")
    assert (start["strategy"], start["precision"], start["train_world"]) == ("fsdp", "bf16", 2)


@pytest.mark.parametrize("bad,named", [
    (["train.channels_last=true"], "train.channels_last=true"),
    (["optim=sgd", "optim.fused=true"], "optim.fused=true"),
])
def test_what_fsdp_cannot_shard_or_step_is_refused_before_anything_runs(tmp_path, bad, named):
    proc = launch(["train", *FAST, "train.strategy=fsdp", *bad, f"run.dir={tmp_path}/run"], check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("launcher: error: ") and named in lines[0] and "train.strategy=ddp" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fsdp_on_a_torch_without_the_fsdp2_api_is_refused_with_one_line(tmp_path):
    """torch < 2.6 has no public torch.distributed.fsdp.fully_shard: emulated by removing it at start-up."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import torch.distributed.fsdp as f\ndel f.fully_shard\n")
    env = {"PYTHONPATH": f"{site}:{ROOT}"}
    proc = launch(["train", *FAST, "train.strategy=fsdp", f"run.dir={tmp_path}/run"], check=False, timeout=120, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "torch>=2.6" in lines[0] and "torch.distributed.fsdp.fully_shard" in lines[0] and "ddp" in lines[0]
    assert not (tmp_path / "run").exists()
    ok = launch(["train", *FAST, "train.max_steps=1", "validation.mode=off", f"run.dir={tmp_path}/ddp"], env=env,
                timeout=120)
    assert ok.returncode == 0  # ddp needs none of it


@pytest.mark.slow
def test_an_fsdp_oom_restarts_on_a_torch_that_cannot_reset_a_step(tmp_path):
    """torch < 2.13 has no FSDPModule.reset_iter_state (the GPU machine's 2.11; emulated by removing it): an
    OOM agreed on mid-step cannot be redone in place, so every rank records the halved micro-batch and exits
    75, and torchrun's restart resumes from the last checkpoint with it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("from torch.distributed.fsdp import FSDPModule\n"
                                           "del FSDPModule.reset_iter_state\n")
    run = tmp_path / "run"
    proc = launch(["train", *FAST, "validation.mode=off", "train.strategy=fsdp", "batch.size=32",
                   "batch.global_size=128", "train.max_steps=4", "checkpoint.every_steps=1",
                   "debug.simulate_oom_at_step=2", f"run.dir={run}"], nproc=2, timeout=300,
                  torchrun_args=["--max-restarts=1"], env={"PYTHONPATH": f"{site}:{ROOT}"})
    assert "exitcode: 75" in proc.stderr.replace("exitcode : ", "exitcode: ")
    events = read_jsonl(run / "events.jsonl")
    assert {(e["step"], e["micro_from"], e["micro_to"]) for e in events if e["event"] == "oom_restart"} == {(1, 32, 16)}
    assert [e["step"] for e in events if e["event"] == "resume"] == [1]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["micro_batch"], summary["accum"]) == (4, 16, 4)
