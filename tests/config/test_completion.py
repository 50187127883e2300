"""Shell completion (issue 27, item 7): a TAB imports neither torch nor Hydra, offers only what `train`
accepts, and `-sc query=bash` typed by hand is one line, not a traceback. Latency: benchmarks/completion.py."""
import subprocess
import sys

import pytest

from conftest import ROOT, child_env, launch


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A completion cache filled the way a user fills it: `launcher train -sc install=bash`."""
    home = tmp_path_factory.mktemp("cache")
    out = launch(["train", "-sc", "install=bash"], env={"XDG_CACHE_HOME": str(home)}, timeout=300).stdout
    assert "complete" in out and out.rstrip().endswith("launcher")
    return home


def tab(line: str, cache) -> list:
    proc = launch(["-sc", "query=bash"], env={"XDG_CACHE_HOME": str(cache), "COMP_LINE": line}, timeout=60)
    return proc.stdout.split()


def test_a_tab_imports_neither_torch_nor_hydra(cache):
    code = ("import sys; from launcher.__main__ import main; main(['-sc', 'query=bash']); "
            "print(sorted(m for m in ('torch', 'hydra', 'omegaconf', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=child_env({"XDG_CACHE_HOME": str(cache), "COMP_LINE": "launcher train optim.l"}))
    assert proc.stdout.splitlines() == ["optim.lr=", "[]"], proc.stdout + proc.stderr


def test_only_what_train_accepts_is_offered(cache):
    from launcher.config.schema import flat_defaults
    from launcher.jobs.mnist1d import Mnist1dJob

    assert set(tab("launcher train ", cache)) == {f"{k.split('.')[0]}." for k, _, _ in flat_defaults() if k != "job"} \
        | {"job.", "job=", "optim=", "hydra."}
    assert tab("launcher train hy", cache) == ["hydra."] and tab("launcher train hydra.", cache) == ["hydra.verbose="]
    offered, frontier = set(), [f"{s}." for s in ("run", "train", "data", "ddp", "dist", "batch", "autobatch", "optim",
                                                  "sched", "ema", "validation", "early_stop", "checkpoint", "logger",
                                                  "debug", "job")]
    for prefix in frontier:  # walk every section down to its keys
        for word in tab(f"launcher train {prefix}", cache):
            (frontier.append(word) if word.endswith(".") else offered.add(word[:-1]))
    expected = {k for k, _, _ in flat_defaults() if k != "job"} | {f"job.{k}" for k, _, _ in flat_defaults(Mnist1dJob)}
    assert offered == expected


def test_values_are_the_choices_or_the_composed_value(cache):
    assert tab("launcher train train.precision=", cache) == [f"train.precision={p}" for p in ("auto", "fp32", "bf16",
                                                                                               "fp16")]
    assert tab("launcher train job=", cache) == ["job=custom", "job=images", "job=mnist1d", "job=synthetic"]
    assert tab("launcher train job=synthetic job.model=v", cache) == ["job.model=vit"]
    assert tab("launcher train optim.lr=", cache) == ["optim.lr=0.01"]  # the mnist1d recipe's
    assert tab("launcher train optim=sgd optim.lr=", cache) == ["optim.lr=0.1"]
    assert tab("launcher ", cache) == ["train", "validate", "report", "sweep"]


def test_a_config_dir_is_read_and_an_edit_is_seen(tmp_path, monkeypatch):
    from launcher.config.completion import candidates

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "optim").mkdir()
    mine = tmp_path / "optim" / "mine.yaml"
    mine.write_text("name: sgd\nlr: 0.5\n")
    assert candidates("launcher train --config-dir ") == []  # a directory: the shell completes it
    line = f"launcher train --config-dir {tmp_path} "
    assert "optim=mine" in candidates(line + "optim=")
    assert candidates(line + "optim=mine optim.lr=") == ["optim.lr=0.5"]
    mine.write_text("name: sgd\nlr: 0.25\n")  # the cache is keyed by the files' mtimes and sizes
    assert candidates(line + "optim=mine optim.lr=") == ["optim.lr=0.25"]


def test_query_typed_by_hand_is_one_line():
    proc = launch(["-sc", "query=bash"], check=False, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == ["launcher: error: -sc query=<shell> answers the shell's completion script, "
                                        'which sets COMP_LINE; to install completion run: eval "$(launcher train '
                                        '-sc install=bash)"']
