"""Which GPU each process gets, and the launches that cannot work (issue 13, item 5).

The mapping is a pure function of the node's shape, so every case is checked here
without GPUs; the command line turns its error into exit 2 before any process group
exists. A GPU-only test (skipped without CUDA) launches one process more than GPUs.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import FAST, launch
from launcher.distributed.env import assign_device
from launcher.config.checks import check_global_size
from launcher.config.schema import Config
from launcher.errors import ConfigError

dev = torch.device


def one_line_error(proc) -> str:
    """The launcher's error line (under torchrun every rank prints it, and torchrun adds its own report)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("launcher: error:")]
    assert lines, proc.stderr
    ours = [ln for ln in proc.stderr.splitlines() if ln.strip().startswith("File ") and "site-packages" not in ln
            and "<frozen" not in ln]
    assert not ours, f"a traceback from the launcher itself: {proc.stderr}"
    return Counter(lines).most_common(1)[0][0]  # ranks writing at once may cut a copy


@pytest.mark.parametrize("local_world,validator", [(8, None), (8, 7), (4, 0), (1, None)])
def test_one_gpu_per_process_in_local_rank_order(local_world, validator):
    got = [assign_device(r, local_world, 8, "auto", validator) for r in range(local_world)]
    assert got == [dev("cuda", r) for r in range(local_world)]


def test_more_processes_than_gpus_is_an_error_not_a_shared_gpu():
    # The old mapping, local_rank % device_count, put ranks 0 and 8 both on GPU 0.
    with pytest.raises(ConfigError) as e:
        assign_device(8, 9, 8, "auto", None)
    msg = str(e.value)
    assert "9 processes on this node but only 8 GPU(s)" in msg and "--nproc_per_node=8" in msg
    assert "\n" not in msg


def test_validator_rank_shares_a_gpu_only_when_allowed():
    with pytest.raises(ConfigError) as e:
        assign_device(8, 9, 8, "auto", 8, share_gpu=False)
    msg = str(e.value)
    assert "validation.share_gpu=true" in msg and "--nproc_per_node=8" in msg and "validation.mode=process" in msg
    # Allowed: the 8 trainers get GPUs 0..7 and the validator (last local rank) shares the last one.
    got = [assign_device(r, 9, 8, "auto", 8, share_gpu=True) for r in range(9)]
    assert got == [dev("cuda", r) for r in range(8)] + [dev("cuda", 7)]
    # A validator in the middle (validation.rank=3): trainers still fill 0..7 in order.
    got = [assign_device(r, 9, 8, "auto", 3, share_gpu=True) for r in range(9)]
    assert got == [dev("cuda", i) for i in (0, 1, 2, 7, 3, 4, 5, 6, 7)]


def test_share_gpu_allows_one_extra_process_only():
    with pytest.raises(ConfigError, match="10 processes on this node but only 8 GPU"):
        assign_device(0, 10, 8, "auto", 9, share_gpu=True)
    # A node without the validator (multi-node: it runs on the last node) gets no exception either.
    with pytest.raises(ConfigError, match=r"9 processes .* 8 GPU\(s\)"):
        assign_device(0, 9, 8, "auto", None, share_gpu=True)


def test_cpu_and_missing_gpus():
    assert assign_device(3, 9, 8, "cpu", None) == dev("cpu")  # any shape works on the CPU
    assert assign_device(1, 2, 0, "auto", None) == dev("cpu")
    with pytest.raises(ConfigError, match="train.device=cuda but no CUDA GPU is visible"):
        assign_device(0, 1, 0, "cuda", None)


def test_global_size_that_the_training_ranks_cannot_split_names_the_validator_and_what_works():
    cfg = Config()
    cfg.batch.global_size = 256
    check_global_size(cfg, 1)  # one process: nothing to split
    with pytest.raises(ConfigError) as e:
        check_global_size(cfg, 8)  # 8 GPUs, validation.mode=auto: 7 trainers + the validator rank
    msg = str(e.value)
    assert "not divisible by the 7 training ranks (it would be floored to 252)" in msg
    assert "252 or 259" in msg and "validation.mode=process" in msg and "validation.share_gpu=true" in msg
    cfg.validation.mode = "process"
    check_global_size(cfg, 8)  # 8 trainers: fine


def test_share_gpu_is_only_for_the_validator_rank():
    from launcher.config.checks import check

    cfg = Config()
    cfg.validation.share_gpu = True
    check(cfg, 9)
    cfg.validation.mode = "inline"
    with pytest.raises(ConfigError, match="validation.share_gpu=true is for the validator rank"):
        check(cfg, 9)


@pytest.mark.slow
def test_global_size_floor_is_refused_before_training_under_torchrun(tmp_path):
    """4 processes = 3 trainers + the validator rank: batch.size=auto used to floor 256 to 255 and train."""
    proc = launch(["train", *FAST, "batch.size=auto", "batch.global_size=256", f"run.dir={tmp_path}/run"],
                  nproc=4, check=False, timeout=240)
    assert proc.returncode != 0
    line = one_line_error(proc)
    assert "batch.global_size=256 is not divisible by the 3 training ranks (it would be floored to 255)" in line
    assert "validation.mode=process" in line
    assert not (tmp_path / "run").exists(), "refused before any process group or run directory"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_train_device_cuda_without_a_gpu_exits_2_with_one_line(tmp_path):
    proc = launch(["train", *FAST, "train.device=cuda", f"run.dir={tmp_path}/run"], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [one_line_error(proc)]
    assert "train.device=cuda but no CUDA GPU is visible" in proc.stderr and "train.device=cpu" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_one_process_more_than_gpus(tmp_path):
    """On a real GPU node: G+1 processes fail at once without validation.share_gpu, and train with it."""
    gpus = torch.cuda.device_count()
    proc = launch(["train", *FAST, f"run.dir={tmp_path}/refused"], nproc=gpus + 1, check=False, timeout=240)
    assert proc.returncode != 0
    assert f"{gpus + 1} processes on this node but only {gpus} GPU(s)" in one_line_error(proc)
    assert not (tmp_path / "refused").exists()
    run = tmp_path / "shared"
    launch(["train", *FAST, "train.epochs=1", "validation.share_gpu=true", f"run.dir={run}"], nproc=gpus + 1,
           timeout=400)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] > 0
    start = [json.loads(ln) for ln in (run / "events.jsonl").read_text().splitlines() if '"start"' in ln][0]
    assert start["train_world"] == gpus
