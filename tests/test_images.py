"""job=images: an ImageFolder made here with PIL, a tiny timm model, the launcher's real processes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import launch, read_jsonl

pytest.importorskip("PIL")
# The job's own import (it copes with PyPI's CUDA-built torchvision beside a CPU torch); skip without the extra.
vision = pytest.importorskip("launcher.jobs.images").vision
try:
    TV, TIMM = vision()
except ImportError:
    pytest.skip("torchvision is not installed (pip install -e '.[vision]')", allow_module_level=True)

COLORS = [(220, 40, 40), (40, 200, 40), (40, 60, 220)]  # one class per dominant colour: learnable in a few steps
QUIET = ["logger.wandb.mode=disabled", "logger.progress=plain", "logger.telemetry.every_s=0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from PIL import Image
    import numpy as np

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        for c, color in enumerate(COLORS):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, (40, 48, 3))
                pixels = np.clip(np.array(color) + noise, 0, 255).astype("uint8")
                Image.fromarray(pixels).save(d / f"{i}.jpg" if i % 2 else d / f"{i}.png")
    return root


def args(folder: Path, run_dir: Path, *extra: str) -> list:
    return ["train", "job=images", f"job.data_dir={folder}", "job.model=test_resnet" if TIMM else "job.model=resnet18",
            "job.image_size=32", "train.epochs=3", "batch.size=auto", "validation.weights=both",
            "checkpoint.every_steps=0", *QUIET, f"run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_single_process_trains_validates_both_and_reports(folder, tmp_path):
    import torch

    # A local "pretrained" file with another classifier shape: the body loads, the head stays random.
    pretrained = tmp_path / "weights.pth"
    if TIMM:
        torch.save(TIMM.create_model("test_resnet", num_classes=10).state_dict(), pretrained)
    else:
        torch.save(TV.models.resnet18(num_classes=10).state_dict(), pretrained)
    run = tmp_path / "run"
    launch(args(folder, run, f"job.pretrained={pretrained}", "data.workers=1"))
    summary = json.loads((run / "summary.json").read_text())
    # 48 training images, micro-batch 32 (the job's default on CPU): one step per epoch.
    assert summary["steps"] == 3 and summary["micro_batch"] == 32
    assert {"best_raw", "best_ema", "final_raw", "final_ema"} <= summary.keys()
    kinds = {(r["step"], r["weights"]) for r in read_jsonl(run / "val" / "results.jsonl")}
    assert {(3, "raw"), (3, "ema")} <= kinds
    log = (run / "logs" / "rank-0.log").read_text()
    assert "pretrained" in log and "tensors loaded" in log
    proc = launch(["report", str(run)])
    assert (run / "report" / "report.md").exists(), proc.stdout


@pytest.mark.slow
def test_torchrun_with_validator_rank_then_resume(folder, tmp_path):
    run = tmp_path / "run"
    launch(args(folder, run, "train.channels_last=true"), nproc=2)  # 1 trainer + the validator rank
    first = json.loads((run / "summary.json").read_text())
    assert first["steps"] == 3 and "best_ema" in first
    launch(args(folder, run, "train.epochs=5"), nproc=2)  # same run dir, longer: resumes at step 3
    resumes = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert [e["step"] for e in resumes] == [3]
    assert json.loads((run / "summary.json").read_text())["steps"] == 5
    assert {r["step"] for r in read_jsonl(run / "val" / "results.jsonl")} >= {3, 5}


@pytest.mark.parametrize("extra, words", [
    ([], "job.data_dir=<dir>"),
    (["job.data_dir=/nonexistent/images"], "no class folders"),
    (["job.model=no_such_model_xyz"], "not a model name"),
    (["job.pretrained=/nonexistent/w.pth"], "nothing is downloaded"),
])
@pytest.mark.slow
def test_bad_images_config_exits_2_with_one_line(folder, tmp_path, extra, words):
    base = ["train", "job=images", *QUIET, f"run.dir={tmp_path / 'run'}"]
    if not any(e.startswith("job.data_dir") for e in extra) and extra:
        base.append(f"job.data_dir={folder}")
    proc = launch(base + extra, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()  # rejected before a run directory exists


def test_missing_torchvision_exits_2_naming_the_extra(folder, tmp_path):
    # A torchvision that cannot be imported, first on the path: the job says what to install.
    fake = tmp_path / "fake"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text("raise ImportError('no torchvision here')\n")
    proc = launch(["train", "job=images", f"job.data_dir={folder}", *QUIET, f"run.dir={tmp_path / 'run'}"],
                  check=False, env={"PYTHONPATH": f"{Path(__file__).resolve().parent.parent}:{fake}"})
    assert proc.returncode == 2 and ".[vision]" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr
