"""launcher/data.py: the persistent training loader's sample order across a resume, and the evaluation
loader's options."""
from __future__ import annotations

import torch

from conftest import FAST, final_weights, launch
import pytest


@pytest.mark.slow
def test_persistent_loader_resumes_mid_epoch_like_a_fresh_loader(tmp_path):
    """One DataLoader for the whole run (a persistent worker, prefetch), hard-killed mid-epoch
    and relaunched, ends bit-identical to a run with a fresh single-process loader per epoch
    that never stopped: same samples, same order, epoch after epoch, resume included."""
    args = [*FAST, "batch.size=128", "validation.mode=off", "checkpoint.every_steps=10"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    launch(["train", *args, f"run.dir={straight}", "data.workers=0"])
    workers = [*args, f"run.dir={broken}", "data.workers=1", "data.prefetch=3"]
    assert launch(["train", *workers, "debug.fail_at_step=40"], check=False).returncode != 0
    launch(["train", *workers])
    a, b = final_weights(straight), final_weights(broken)
    assert a["step"] == b["step"] == 62 and a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_validator_loader_uses_workers_and_pinned_memory_on_a_gpu():
    """Issue 14 item 4: the evaluation DataLoader has worker processes (persistent) and pinned batches on
    a GPU by default; validation.workers sets the count (default -1: data.workers, at least 2 on a GPU)."""
    from launcher.data import eval_loader_options as loader_options
    from launcher.config.schema import Config
    cfg = Config()
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert loader_options(cfg, gpu) == {"num_workers": 2, "pin_memory": True, "persistent_workers": True}
    assert loader_options(cfg, cpu) == {"num_workers": 0, "pin_memory": False}
    cfg.data.workers = 8
    assert loader_options(cfg, gpu)["num_workers"] == loader_options(cfg, cpu)["num_workers"] == 8
    cfg.validation.workers, cfg.data.pin_memory = 0, False
    assert loader_options(cfg, gpu) == {"num_workers": 0, "pin_memory": False}
