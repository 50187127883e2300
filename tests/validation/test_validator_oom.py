"""The validator's device: its own CUDA device set, the trainer's backend flags, an out-of-memory error
halving its batch instead of ending validation, and the share of a GPU it gets beside a trainer."""
import json
import re
import subprocess
import time

import pytest
import torch

from conftest import FAST, launch, read_jsonl


@pytest.mark.slow
def test_an_out_of_memory_validation_halves_its_batch_and_keeps_it(run_dir):
    """validation.batch_size=400 on a (simulated) device where more than 150 samples run out of memory: the
    first validation retries at 200, then 100, and validates; the next starts at 100. Training never notices."""
    launch(["train", *FAST, "train.max_steps=20", "validation.every_steps=10", "validation.policy=all",
            "validation.mode=process", "validation.batch_size=400", "debug.simulate_oom_above=150",
            "train.cudnn_benchmark=false", f"run.dir={run_dir}"])
    rows = read_jsonl(run_dir / "val" / "results.jsonl")
    assert [(r["step"], r["batch_size"]) for r in rows] == [(10, 100), (20, 100)]
    log = (run_dir / "logs" / "rank-validator.log").read_text()
    assert re.findall(r"validation out of memory at batch (\d+) .*retrying with batch (\d+)", log) == \
        [("400", "200"), ("200", "100")]
    assert "cudnn.benchmark False, tf32 True" in log  # the trainer's backend flags
    assert json.loads((run_dir / "summary.json").read_text())["unvalidated_steps"] == []


def test_the_validators_gpu_is_known_from_the_launch_alone():
    """Which training rank's GPU also runs the validator (pure: no GPU needed): training rank 0 with
    validation.mode=process when no GPU is free; with validation.share_gpu the last GPU's trainer."""
    from launcher.distributed.env import Env, shares_gpu_with_validator

    def env(rank, world, local_world, device, mode, validator=None):
        return Env(rank=rank, world_size=world, local_rank=rank, local_world_size=local_world, restart_count=0,
                   validator_rank=validator, device=device, validation_mode=mode)

    gpu = lambda i: torch.device("cuda", i)  # noqa: E731
    assert shares_gpu_with_validator(env(0, 1, 1, gpu(0), "process"), device_count=1)  # one GPU, the default
    assert not shares_gpu_with_validator(env(0, 1, 1, gpu(0), "process"), device_count=2)  # cuda:1 is free
    assert not shares_gpu_with_validator(env(1, 2, 2, gpu(1), "process"), device_count=2)  # not rank 0's child
    assert not shares_gpu_with_validator(env(0, 1, 1, torch.device("cpu"), "process"), device_count=0)
    # 9 processes on 8 GPUs with share_gpu: the validator rank 8 on GPU 7, with training rank 7
    assert shares_gpu_with_validator(env(7, 9, 9, gpu(7), "rank", validator=8), device_count=8)
    assert shares_gpu_with_validator(env(8, 9, 9, gpu(7), "rank", validator=8), device_count=8)  # the validator's side
    assert not shares_gpu_with_validator(env(6, 9, 9, gpu(6), "rank", validator=8), device_count=8)
    # 8 processes on 8 GPUs: the validator rank has a GPU of its own
    assert not shares_gpu_with_validator(env(6, 8, 8, gpu(6), "rank", validator=7), device_count=8)
    assert not shares_gpu_with_validator(env(7, 8, 8, gpu(7), "rank", validator=7), device_count=8)


def test_a_gpu_share_the_trainer_cannot_leave_is_refused(tmp_path):
    proc = launch(["train", *FAST, "validation.gpu_share=0.95", f"run.dir={tmp_path}/run"], check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "validation.gpu_share=0.95" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_one_gpu_the_probe_leaves_the_validator_its_share(run_dir):
    """One GPU, validation.mode=process (the default with one process): the trainer's probe limit is
    (autobatch.fraction - validation.gpu_share) of the GPU, and autobatch.json states the validator's budget."""
    launch(["train", *FAST, "batch.size=auto", "train.max_steps=4", "validation.mode=process",
            "validation.gpu_share=0.2", f"run.dir={run_dir}"])
    record = json.loads((run_dir / "autobatch.json").read_text())
    total = torch.cuda.mem_get_info(0)[1]
    assert record["validator_budget_bytes"] == int(0.2 * total)
    assert record["per_rank"][0]["limit_bytes"] == int((0.9 - 0.2) * total)
    assert "(shared with a trainer)" in (run_dir / "logs" / "rank-validator.log").read_text()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_the_validator_makes_no_cuda_context_on_another_gpu(run_dir):
    """A validator process on cuda:1 (a GPU of its own beside one trainer) sets its device before its pinned
    loader thread runs: NVML never lists the validator's process on GPU 0 while it validates."""
    pynvml = pytest.importorskip("pynvml")
    from conftest import child_env, command
    from launcher.telemetry.gpu import _handle

    proc = subprocess.Popen(command(["train", *FAST, "train.max_steps=40", "validation.every_steps=10",
                                     "validation.mode=process", "data.workers=2", "debug.val_delay_s=1",
                                     f"run.dir={run_dir}"]), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pynvml.nvmlInit()
    gpu0, _ = _handle(pynvml, torch.cuda.get_device_properties(0).uuid)
    seen, pid = [], None
    while proc.poll() is None:
        status = run_dir / "handoff" / "validator.json"
        pid = pid or (json.loads(status.read_text()).get("pid") if status.exists() else None)
        seen += [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(gpu0)]
        time.sleep(0.2)
    assert proc.returncode == 0 and pid is not None and read_jsonl(run_dir / "val" / "results.jsonl")
    assert pid not in seen
