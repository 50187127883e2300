"""Start-up keeps its promises (issue 27, item 5): bad input found from the data exits 2 before anything is
created; Ctrl-C while torch is still importing is one line; a custom job without a target shows the form."""
import signal
import subprocess
import time

import pytest

from conftest import FAST, child_env, command, interruptible, launch


def test_a_batch_larger_than_the_training_set_creates_nothing(tmp_path):
    proc = launch(["train", *FAST, "batch.size=5000"], cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["launcher: error: the effective batch 5000 is larger than the training set "
                                        "(4000 samples); lower batch.size or batch.global_size"]
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []  # no runs/<id>/, nothing


@pytest.mark.parametrize("after_s", [0.4, 1.0])
def test_ctrl_c_while_importing_is_one_line(after_s, tmp_path):
    """SIGINT a fraction of a second after the start: torch and Hydra are still importing (seconds)."""
    proc = subprocess.Popen(command(["train", *FAST]), cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines() == ["launcher: interrupted"], err
    assert list(tmp_path.iterdir()) == []


def test_a_custom_job_without_target_shows_the_form(tmp_path):
    proc = launch(["train", "job=custom", f"run.dir={tmp_path}/run"], check=False, timeout=120)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("launcher: error: job.target") and "job.target=<package.module>:<Class>" in line, line
    assert not (tmp_path / "run").exists()
