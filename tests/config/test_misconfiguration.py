"""Silent misconfiguration made loud: a metric the job lacks, a run whose every checkpoint is corrupt."""
from collections import Counter

import pytest

from conftest import FAST, ROOT, launch, read_jsonl

TINY_JOB = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
from launcher.jobs import Job


class Tiny(Job):
    """Overrides metrics() without declaring metric_names: the launcher cannot know them up front."""

    def model(self):
        return nn.Linear(4, 2)

    def datasets(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 4, generator=g)
        return TensorDataset(x, (x[:, 0] > 0).long()), TensorDataset(x[:64], (x[:64, 0] > 0).long())

    def metrics(self, output, target):
        return {"hits": (output.argmax(-1) == target).sum().float()}
'''


def test_a_metric_the_job_does_not_declare_is_refused_before_anything_runs(tmp_path):
    proc = launch(["train", *FAST, "validation.metric=f1", f"run.dir={tmp_path}/run"], check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "validation.metric='f1'" in lines[0] and "loss, acc" in lines[0]
    assert not (tmp_path / "run").exists()


def test_an_undeclared_metric_is_said_loudly_at_the_first_validation(tmp_path):
    (tmp_path / "tiny_job.py").write_text(TINY_JOB)
    proc = launch(["train", "job=custom", "job.target=tiny_job:Tiny", "job.batch_size=32", "train.epochs=2",
                   "validation.mode=inline", "logger.wandb.mode=disabled", "logger.progress=plain",
                   f"run.dir={tmp_path}/run"], env={"PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert proc.stdout.count("validation.metric='acc' is not among the job's metrics (hits)") == 1, proc.stdout
    assert not (tmp_path / "run" / "best" / "best.json").exists()


@pytest.mark.slow
def test_every_checkpoint_corrupt_restarts_loudly_with_consistent_metrics(tmp_path):
    run = tmp_path / "run"
    args = ["train", *FAST, "train.epochs=1", "validation.mode=off", "checkpoint.every_steps=20",
            "train.log_every=10", f"run.dir={run}"]
    launch([*args, "debug.fail_at_step=40"], check=False)  # dies unfinished (a finished run has nothing to do)
    checkpoints = sorted((run / "checkpoints").glob("step-*.pt"))
    assert checkpoints
    for path in checkpoints:  # flip a byte in the middle of every one
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    proc = launch(args)
    assert "no checkpoint in" in proc.stdout and "starting again from step 0" in proc.stdout, proc.stdout
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps and max(Counter(steps).values()) == 1, steps  # no step logged twice
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    assert events.count("restart_from_scratch") == 1 and "resume" not in events
