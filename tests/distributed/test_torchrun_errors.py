"""Errors under torchrun look like errors, not crashes (issue 27, item 4): the one line is printed once, torchrun's
failure summary names it as the root cause (its error file), and the rules are the same for one process and many."""
import pytest

from conftest import launch


@pytest.mark.slow
def test_a_bad_key_under_torchrun_is_one_line_and_the_root_cause(tmp_path):
    proc = launch(["train", "train.epoch=3", f"run.dir={tmp_path}/run"], nproc=2, check=False, timeout=180)
    assert proc.returncode == 1  # torchrun's own status when a worker fails (the worker exited 2); see README
    said = [ln for ln in proc.stderr.splitlines() if ln.startswith("launcher: error:")]
    assert said == ["launcher: error: unknown config key 'train.epoch'; valid keys under 'train': epochs, max_steps, "
                    "precision, grad_clip, log_every, device, threads, compile, channels_last, cudnn_benchmark, "
                    "tf32, strategy"], proc.stderr
    root = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert f"traceback : {said[0]}" in root and "exitcode  : 2" in root
    assert "To enable traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_validation_rank_is_checked_for_one_process_too(tmp_path):
    proc = launch(["train", "validation.rank=5", f"run.dir={tmp_path}/run"], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["launcher: error: validation.rank=5 is not valid for 1 process; use -1..0"]
    assert not (tmp_path / "run").exists()
