"""The command line: bad input exits 2 with one line naming the key; Hydra's flags work."""
import pytest

from conftest import ROOT, launch

BAD = [
    (["train.foo=1"], "train.foo"),
    (["train.epochs=abc"], "train.epochs"),
    (["job=nope"], "job/nope"),
    (["ema.ramp=linear"], "ema.ramp"),
    (["validation.mode=rank"], "validation.mode=rank"),
    (["batch.size=0"], "batch.size"),
    (["batch.size=big"], "batch.size"),
    (["batch.global_size=100", "batch.size=64"], "batch.global_size"),
    (["job.target=no.such.module:Job"], "job.target"),
    (["+train.extra=3"], "train.extra"),
    (["optim.name=lion"], "optim.name"),
    (["train.epochs=0"], "train.epochs"),
    (["-m", "optim.lr=0.1,-1"], "optim.lr"),  # a sweep's bad point: refused before any point runs
]


@pytest.mark.parametrize("args,key", BAD, ids=[b[1] for b in BAD])
def test_bad_input_exits_2_with_one_line(args, key, tmp_path):
    proc = launch(["train", *args, f"run.dir={tmp_path}/run"], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and lines[0].startswith("launcher: error:")
    assert not (tmp_path / "run").exists(), "bad input must not start a run"


@pytest.mark.slow
def test_bad_input_under_torchrun_fails_before_training(tmp_path):
    proc = launch(["train", "train.nope=1", f"run.dir={tmp_path}/run"], nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert "unknown config key 'train.nope'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_hydra_flags_cfg_and_help():
    out = launch(["train", "job=synthetic", "--cfg", "job"], timeout=120).stdout
    assert "name: synthetic" in out and "optim:" in out
    out = launch(["train", "--help"], timeout=120).stdout
    groups = out.split("== Configuration groups ==")[1].split("== Config ==")[0]  # Hydra's own help sections
    [jobs] = [line for line in groups.splitlines() if line.startswith("job: ")]
    assert sorted(jobs[len("job: "):].split(", ")) == sorted(p.stem for p in (ROOT / "conf" / "job").glob("*.yaml"))
    assert "mnist1d" in out and "optim" in out


def test_unknown_command_exits_2():
    proc = launch(["fly"], check=False, timeout=60)
    assert proc.returncode == 2 and "unknown command" in proc.stderr
