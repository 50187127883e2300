"""Habits of Hydra, wandb and terminal users work unchanged; bad input is one line (issue 15)."""
import os
import signal
import subprocess
import time

import pytest

from conftest import FAST, ROOT, child_env, command, interruptible, launch, read_jsonl

SHORT = [*FAST, "train.max_steps=3", "validation.mode=off"]
CUSTOM = [a for a in SHORT if not a.startswith("job.")]  # for job=custom


def one_error_line(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("launcher: error:"), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------- 3: --config-dir
@pytest.mark.parametrize("form", ["--config-dir", "-cd", "--config-dir="])
def test_config_dir_trains_with_a_users_own_group(tmp_path, form):
    conf = tmp_path / "myconf"
    (conf / "optim").mkdir(parents=True)
    (conf / "optim" / "mysgd.yaml").write_text("name: sgd\nlr: 0.0123\nmomentum: 0.5\nnesterov: false\n")
    flag = [f"{form}{conf}"] if form.endswith("=") else [form, str(conf)]
    run = tmp_path / "run"
    launch(["train", *flag, "optim=mysgd", *SHORT, f"run.dir={run}"], cwd=tmp_path, timeout=180)
    saved = (run / "config.yaml").read_text()
    assert "lr: 0.0123" in saved and "name: sgd" in saved
    assert (run / "summary.json").exists() and not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------------- 4: hydra.* keys
@pytest.mark.parametrize("arg", ["hydra.run.dir=somewhere", "hydra.job.chdir=true", "hydra.sweep.dir=x"])
def test_hydra_keys_without_meaning_are_refused(arg, tmp_path):
    proc = launch(["train", arg, f"run.dir={tmp_path}/run"], check=False, cwd=tmp_path, timeout=120)
    one_error_line(proc, arg.split("=")[0], "run.dir")
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()


def test_hydra_verbose_turns_on_debug_logging(tmp_path):
    proc = launch(["train", "hydra.verbose=true", *SHORT, f"run.dir={tmp_path}/run"], timeout=180)
    assert "the resolved config" in proc.stdout
    assert " DEBUG " in (tmp_path / "run" / "logs" / "rank-0.log").read_text()


# ------------------------------------------------------------------------------ 6: shell completion
@pytest.mark.parametrize("args", [["-sc", "query=bash"], ["train", "-sc", "query=bash"],
                                  ["train", "--shell-completion", "query=bash"]])
def test_shell_completion_offers_keys_and_groups(args):
    proc = launch(args, env={"COMP_LINE": "launcher train "}, timeout=120)
    words = proc.stdout.split()
    assert {"job=", "optim=", "train.", "validation."} <= set(words), proc.stdout
    proc = launch(args, env={"COMP_LINE": "launcher train job="}, timeout=120)
    assert set(proc.stdout.split()) == {"job=custom", "job=images", "job=mnist1d", "job=synthetic"}, proc.stdout


def test_shell_completion_install_script():
    out = launch(["train", "-sc", "install=bash"], timeout=120).stdout
    assert "complete" in out and out.rstrip().endswith("launcher")


def test_help_hides_and_train_refuses_internal_schemas(tmp_path):
    out = launch(["train", "--help"], timeout=120).stdout
    assert "mnist1d" in out and "_schema" not in out
    proc = launch(["train", "job=mnist1d_schema", f"run.dir={tmp_path}/run"], check=False, timeout=120)
    one_error_line(proc, "job=mnist1d_schema", "mnist1d")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------- 7: tracebacks become one line
NO_MODEL = "import torch\nfrom launcher.jobs.base import Job\n\nclass NoModel(Job):\n" \
           "    def datasets(self):\n        return [], []\n"


@pytest.mark.parametrize("case", ["cuda", "readonly", "yaml", "no_model"])
def test_bad_input_that_used_to_be_a_traceback(case, tmp_path):
    run, env, args = tmp_path / "run", {}, []
    if case == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        args, words = ["train.device=cuda"], ["train.device=cuda", "cpu"]
    elif case == "readonly":
        if os.geteuid() == 0:  # root writes through file modes; /sys refuses even root
            run = "/sys/launcher-test/run"
        else:
            (tmp_path / "ro").mkdir(mode=0o555)
            run = tmp_path / "ro" / "run"
        words = ["run.dir", "writable"]
    elif case == "yaml":
        (tmp_path / "c" / "optim").mkdir(parents=True)
        (tmp_path / "c" / "optim" / "bad.yaml").write_text("name: sgd\nlr: [0.1\n")
        args, words = ["--config-dir", str(tmp_path / "c"), "optim=bad"], ["bad.yaml"]
    else:
        (tmp_path / "nomodel_job.py").write_text(NO_MODEL)
        env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
        args, words = ["job=custom", "job.target=nomodel_job:NoModel"], ["model()", "job.target"]
    rest = CUSTOM if case == "no_model" else SHORT
    proc = launch(["train", *args, *rest, f"run.dir={run}"], env=env, check=False, cwd=tmp_path, timeout=120)
    one_error_line(proc, *words)
    assert not os.path.exists(run)


SLOW_DATA = """import os, time, torch
from torch.utils.data import TensorDataset
from launcher.jobs.base import Job

class SlowData(Job):
    def model(self):  # built after the run directory exists (the data sets are built before it, at the checks)
        open(os.environ["SLOW_MARKER"], "w").close()
        time.sleep(60)
        return torch.nn.Linear(40, 10)

    def datasets(self):
        x = torch.randn(100, 40)
        return TensorDataset(x, x[:, 0].long()), TensorDataset(x, x[:, 0].long())
"""


def test_ctrl_c_during_start_up_is_one_line_and_leaves_no_run_dir(tmp_path):
    (tmp_path / "slowdata_job.py").write_text(SLOW_DATA)
    marker, run = tmp_path / "marker", tmp_path / "run"
    env = child_env({"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "SLOW_MARKER": str(marker)})
    proc = subprocess.Popen(command(["train", "job=custom", "job.target=slowdata_job:SlowData", *CUSTOM,
                                     f"run.dir={run}"]), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert run.exists(), "the run directory exists while the job builds its model"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and "interrupted" in err
    assert not run.exists(), "a run directory without a checkpoint is removed"


# ---------------------------------------------------------------------- 8: run.resume=must up front
@pytest.mark.parametrize("empty", [False, True])
def test_resume_must_without_checkpoint_creates_nothing(tmp_path, empty):
    run = tmp_path / "run"
    if empty:
        run.mkdir()
    proc = launch(["train", "run.resume=must", "job.model=mlp", "logger.progress=plain", f"run.dir={run}"],
                  check=False, cwd=tmp_path, env={"WANDB_MODE": "offline"}, timeout=120)
    one_error_line(proc, "run.resume=must", "run.resume=auto")
    assert (list(run.iterdir()) == []) if empty else not run.exists()


@pytest.mark.slow
def test_resume_must_under_torchrun_creates_nothing(tmp_path):
    run = tmp_path / "run"
    proc = launch(["train", "run.resume=must", *FAST, f"run.dir={run}"], nproc=2, check=False, timeout=120)
    assert proc.returncode != 0 and "run.resume=must" in proc.stderr
    assert not run.exists()


# ------------------------------------------------------------------ 11: wandb's environment variables
NO_WANDB = [a for a in SHORT if not a.startswith("logger.wandb")]


def test_wandb_mode_disabled_in_the_environment_is_honoured(tmp_path):
    run = tmp_path / "run"
    launch(["train", *NO_WANDB, f"run.dir={run}"], env={"WANDB_MODE": "disabled"}, timeout=180)
    assert "mode: disabled" in (run / "config.yaml").read_text()
    assert not (run / "wandb").exists() and not (run / "wandb_id").exists()


@pytest.mark.slow
def test_wandb_environment_fills_defaults_and_the_command_line_wins(tmp_path):
    run = tmp_path / "run"
    launch(["train", *NO_WANDB, "logger.wandb.mode=offline", f"run.dir={run}"], timeout=180,
           env={"WANDB_MODE": "disabled", "WANDB_PROJECT": "from-env", "WANDB_ENTITY": "someone"})
    saved = (run / "config.yaml").read_text()
    assert "mode: offline" in saved and "project: from-env" in saved and "entity: someone" in saved
    runs = list((run / "wandb").glob("offline-run-*"))
    assert runs and (run / "wandb_id").read_text().strip() in runs[0].name


def test_bad_wandb_mode_in_the_environment_is_one_line(tmp_path):
    proc = launch(["train", *NO_WANDB, f"run.dir={tmp_path}/run"], env={"WANDB_MODE": "sometimes"},
                  check=False, timeout=120)
    one_error_line(proc, "WANDB_MODE", "offline")


# --------------------------------------------------------------- 13: a finished validator is not dead
@pytest.mark.slow
def test_default_torchrun_run_has_no_validator_down(tmp_path):
    run = tmp_path / "run"
    proc = launch(["train", *FAST, "train.max_steps=20", "validation.every_steps=10", f"run.dir={run}"],
                  nproc=2, timeout=240)
    events = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    assert "validator_down" not in events, events
    assert "validator is gone" not in proc.stdout + proc.stderr
    assert {r["step"] for r in read_jsonl(run / "val" / "results.jsonl")} >= {20}


# ---------------------------------------------------------------------------- 15: CPU threads
@pytest.mark.parametrize("setting", ["auto", "OMP_NUM_THREADS", "train.threads"])
@pytest.mark.slow
def test_cpu_threads_are_split_between_trainer_and_validator(tmp_path, setting):
    """One thread per core in every process oversubscribes the CPU (trainer + validator process): the
    cores are split between them unless OMP_NUM_THREADS or train.threads says otherwise."""
    run = tmp_path / "run"
    env = child_env({"OMP_NUM_THREADS": "1"} if setting == "OMP_NUM_THREADS" else {})
    if setting != "OMP_NUM_THREADS":
        env.pop("OMP_NUM_THREADS")  # as a user's shell has it
    extra = ["train.threads=1"] if setting == "train.threads" else []
    subprocess.run(command(["train", *SHORT[:-1], "train.max_steps=10", *extra, f"run.dir={run}"]), env=env,
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    [threads] = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "threads"]
    cores = len(os.sched_getaffinity(0))
    expected = {"auto": max(1, cores // 2), "OMP_NUM_THREADS": 1, "train.threads": 1}[setting]
    assert threads["trainer"] == expected and threads["source"] == setting
    if setting != "OMP_NUM_THREADS":
        assert threads["trainer"] + threads["validator"] <= max(cores, 2)
    log = (run / "logs" / "rank-validator.log").read_text()
    assert f"validator: {threads['validator']} CPU thread(s)" in log
