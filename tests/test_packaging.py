"""A wheel works on its own: built from this checkout, installed into a fresh venv apart from it, run
from another directory (the configs travel inside the package; the jobs are launcher.jobs)."""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_wheel_trains_from_another_directory(tmp_path):
    src, wheels, venv, work = (tmp_path / n for n in ("src", "wheels", "venv", "elsewhere"))
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(  # a copy: building leaves build/ behind
        ".git", ".venv", ".cache", "runs", "wandb", "outputs", "build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(wheels)], check=True, capture_output=True)
    wheel = next(wheels.glob("launcher-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies (torch, hydra, ...) come from this interpreter's site-packages as a plain path entry:
    # its .pth files (the editable install of this checkout) are not processed, so `launcher` is the wheel's.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(ROOT / ".cache"),
           "OMP_NUM_THREADS": "1"}
    where = subprocess.run([str(python), "-c", "import launcher.jobs, launcher.config.compose as c; "
                            "print(launcher.jobs.__file__); print(c.CONF_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(p.startswith(str(site)) for p in where), where  # the wheel's jobs and configs, not the checkout's
    proc = subprocess.run([str(python), "-c", "import jobs"], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode != 0, "no top-level `jobs` package is installed"
    proc = subprocess.run([str(python), "-m", "launcher", "train", "job.model=mlp", "train.max_steps=5",
                           "validation.mode=off", "logger.wandb.mode=disabled", "logger.progress=plain",
                           "run.dir=run"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "run" / "summary.json").exists() and "done: 5 steps" in proc.stdout
