"""Training end to end: the run directory, DDP under torchrun, equivalence of batch layouts."""
import json

import pytest
import torch

from conftest import FAST, final_weights, launch, read_jsonl


@pytest.mark.slow
def test_single_process_run_writes_the_run_directory(run_dir):
    out = launch(["train", *FAST, f"run.dir={run_dir}"]).stdout
    assert "done:" in out  # the closing summary line
    for name in ("config.yaml", "metrics.jsonl", "events.jsonl", "summary.json", "logs/rank-0.log",
                 "val/results.jsonl", "best/best.json", "best/model.safetensors", "ema.safetensors"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 * 62 and summary["best_step"] > 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 124 and {"loss", "lr", "samples_per_s", "epoch", "ema_decay"} <= rows[-1].keys()
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "job:" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "checkpoints" / "step-00000124.pt").exists()


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_directory(tmp_path):
    # No run.dir and no run.id: rank 0 picks a timestamp id and every rank must use it.
    launch(["train", *FAST, "train.epochs=1", "validation.mode=inline", f"run.root={tmp_path}/runs"], nproc=2,
           cwd=tmp_path)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    assert sorted(p.name for p in (runs[0] / "logs").iterdir()) == ["rank-0.log", "rank-1.log"]
    assert "on 2 training ranks (DDP)" in (runs[0] / "logs" / "rank-1.log").read_text()
    assert not (tmp_path / "outputs").exists(), "Hydra must not create per-rank output dirs"
    events = read_jsonl(runs[0] / "events.jsonl")
    assert sum(e["event"] == "start" for e in events) == 1  # only rank 0 writes run files


def _weights(run_dir):
    return final_weights(run_dir)["model"]


@pytest.mark.slow
def test_ddp_equivalence_two_ranks_one_rank_and_accumulation(tmp_path):
    """2 ranks x 8 == 1 rank x 16 == 1 rank x 8 with 2 accumulation steps."""
    common = [*FAST, "train.epochs=0", "train.max_steps=6", "validation.mode=off", "optim.lr=0.01"]
    launch(["train", *common, "batch.size=8", f"run.dir={tmp_path}/ddp"], nproc=2)
    launch(["train", *common, "batch.size=16", f"run.dir={tmp_path}/one"])
    launch(["train", *common, "batch.size=8", "batch.global_size=16", f"run.dir={tmp_path}/accum"])
    ddp, one, accum = (_weights(tmp_path / n) for n in ("ddp", "one", "accum"))
    start = torch.load(sorted((tmp_path / "one" / "checkpoints").glob("*.pt"))[0], weights_only=True)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=1e-5, rtol=0)
        torch.testing.assert_close(accum[k], one[k], atol=1e-5, rtol=0)
    assert next(e for e in read_jsonl(tmp_path / "accum" / "events.jsonl") if e["event"] == "autobatch")["accum"] == 2
    assert start["step"] == 6


@pytest.mark.slow
def test_sgd_nesterov_warmup_and_yolo_warmups_run(run_dir):
    launch(["train", *FAST, "train.epochs=1", "optim=sgd", "sched.warmup_steps=20", "sched.warmup_momentum=0.8",
            "sched.warmup_bias_lr=0.1", "train.grad_clip=1.0", "train.log_every=1", f"run.dir={run_dir}"])
    lrs = [r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert lrs[0] < lrs[18] and lrs[-1] < lrs[19]  # rises during warmup, then decays
    assert max(lrs) == pytest.approx(0.1, rel=1e-6)
