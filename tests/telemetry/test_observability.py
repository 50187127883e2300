"""wandb (offline, read back from its .wandb file), NVML telemetry, progress lines.

The wandb tests run the real launcher with `logger.wandb.mode=offline` and parse
the transaction log wandb itself wrote (a leveldb-style log of protobuf Records),
so they check what `wandb sync` would upload, not what we meant to send.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, launch, read_jsonl

NO_WANDB = [a for a in FAST if not a.startswith("logger.wandb")]


def wandb_records(path: Path):
    """Protobuf Records of a .wandb file: 7-byte header, then 32 KiB blocks of leveldb log records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def read_wandb(path: Path) -> dict:
    out = {"history": [], "summary": {}, "metrics": [], "run": None}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            for i in r.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "metric":
            out["metrics"].append(r.metric)
        elif kind == "run":
            out["run"] = r.run
    return out


def offline_runs(run_dir: Path) -> list:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """One real 2-rank run, wandb offline, plain progress, NVML asked for (there is no driver here)."""
    run_dir = tmp_path_factory.mktemp("obs") / "run"
    proc = launch(["train", *NO_WANDB, "logger.wandb.mode=offline", "logger.telemetry.every_s=0.2", "train.log_every=5",
                   "validation.every_steps=20", "validation.weights=both", "logger.wandb.tags=[a,b]",
                   "validation.mode=inline", f"run.dir={run_dir}"], nproc=2)  # two training ranks
    return run_dir, proc


@pytest.mark.slow
def test_wandb_offline_has_train_and_val_series_on_their_axes(two_rank_run):
    run_dir, proc = two_rank_run
    files = offline_runs(run_dir)
    assert len(files) == 1, files
    wb = read_wandb(files[0])
    assert wb["run"].run_id == (run_dir / "wandb_id").read_text().strip()
    assert list(wb["run"].tags) == ["a", "b"]
    config = {u.key: json.loads(u.value_json) for u in wb["run"].config.update}
    assert config["optim"]["lr"] == 1e-2 and config["validation"]["weights"] == "both"

    # Train series: one wandb row per metrics.jsonl row, at the optimizer step.
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    train = [h for h in wb["history"] if "train/loss" in h]
    assert [h["trainer/step"] for h in train] == [m["step"] for m in metrics]
    assert [h["train/loss"] for h in train] == pytest.approx([m["loss"] for m in metrics])
    assert all("train/ema_decay" in h and "train/lr" in h for h in train)

    # Validation: its own axis, raw and EMA side by side in one row per validated step.
    results = read_jsonl(run_dir / "val" / "results.jsonl")
    val = [h for h in wb["history"] if "val/step" in h]
    assert [h["val/step"] for h in val] == sorted({r["step"] for r in results})
    for h in val:
        for r in (r for r in results if r["step"] == h["val/step"]):
            assert h[f"val/{r['weights']}/acc"] == pytest.approx(r["metrics"]["acc"])
    axes = {m.glob_name: m.step_metric for m in wb["metrics"] if m.glob_name}
    assert axes["val/*"] == "val/step" and axes["train/*"] == "trainer/step"
    assert all("val/step" not in h for h in train)  # no train row ever moves the val axis

    # Summary: best metric and step, as in best/best.json and summary.json.
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert wb["summary"]["best/acc"] == pytest.approx(best["value"])
    assert wb["summary"]["best/step"] == best["step"]
    assert wb["summary"]["steps"] == metrics[-1]["step"]
    assert f"wandb sync {files[0].parent}" in proc.stdout


def test_progress_plain_lines_parse(two_rank_run):
    run_dir, proc = two_rank_run
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("train step=")]
    rows = [dict(kv.split("=", 1) for kv in ln.split()[1:]) for ln in lines]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [int(r["step"].split("/")[0]) for r in rows] == [m["step"] for m in metrics]
    total = metrics[-1]["step"]
    assert all(r["step"].endswith(f"/{total}") for r in rows)
    for r, m in zip(rows, metrics):
        assert float(r["loss"]) == pytest.approx(m["loss"], abs=1e-4)
        assert float(r["lr"]) == pytest.approx(m["lr"], rel=1e-3, abs=1e-12)
        assert float(r["samples_per_s"]) > 0 and int(r["epoch"]) == m["epoch"]
        assert r["eta"] == "?" or r["eta"].count(":") == 2
    # The last validation's EMA metric rides along once one exists.
    first_val = min(r["step"] for r in read_jsonl(run_dir / "val" / "results.jsonl"))
    later = [r for r in rows if int(r["step"].split("/")[0]) > first_val]
    assert later and all("val_ema_acc" in r for r in later)
    # Only rank 0 draws: one line per logged step, not two.
    assert len(lines) == len(metrics)


def test_telemetry_without_driver_is_one_info_line(two_rank_run):
    run_dir, proc = two_rank_run
    notes = [ln for ln in proc.stdout.splitlines() if "GPU telemetry off" in ln]
    assert len(notes) == 1, proc.stdout
    assert "NVML" in notes[0]
    assert not any("gpu" in m for m in read_jsonl(run_dir / "metrics.jsonl"))
    assert "Traceback" not in proc.stderr


def test_gpu_monitor_is_off_without_nvml():
    """The real pynvml on a machine with no driver: start() returns the no-op sink, no thread."""
    import threading

    from launcher.telemetry.gpu import GpuMonitor
    from launcher.telemetry.off import OFF

    if torch.cuda.is_available():
        pytest.skip("a GPU driver is present here")
    assert GpuMonitor.start([0], every_s=0.1) is OFF
    assert GpuMonitor.start([0], every_s=0) is OFF
    assert OFF.take() is None
    assert not any(t.name == "nvml-telemetry" for t in threading.enumerate())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with an NVIDIA driver")
def test_gpu_monitor_samples_by_uuid():
    import time

    from launcher.telemetry.gpu import GpuMonitor

    mon = GpuMonitor.start([0], every_s=0.05)
    time.sleep(0.3)
    rows = mon.take()
    mon.close()
    assert rows and rows[0]["uuid"].startswith(("GPU-", "MIG-"))
    assert 0 < rows[0]["mem_used_gb"] <= rows[0]["mem_total_gb"]


@pytest.mark.slow
def test_wandb_resume_continues_the_same_run(run_dir):
    """A run killed at step 25 and relaunched logs into the same wandb run id, from the checkpoint on."""
    args = ["train", *NO_WANDB, "logger.wandb.mode=offline", "train.log_every=5", "checkpoint.every_steps=10",
            "train.max_steps=40", "validation.every_steps=20", "debug.fail_at_step=25", f"run.dir={run_dir}"]
    first = launch(args, check=False)
    assert first.returncode == 13, first.stderr[-2000:]
    launch(args)
    run_id = (run_dir / "wandb_id").read_text().strip()
    ckpt = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    assert torch.load(ckpt, weights_only=True)["wandb_id"] == run_id
    files = offline_runs(run_dir)
    assert len(files) == 2
    # wandb names each offline session by run id; the killed one may hold only what wandb flushed before
    # os._exit (wandb-core drops its write buffer when its parent dies), the resumed one holds the run record.
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2
    second = read_wandb(files[1])
    assert second["run"].run_id == run_id
    steps = [h["trainer/step"] for h in second["history"] if "train/loss" in h]
    assert steps[0] == 25 and steps[-1] == read_jsonl(run_dir / "metrics.jsonl")[-1]["step"]  # resumed at 20


@pytest.mark.slow
def test_broken_wandb_never_stops_training(run_dir, tmp_path):
    """An import that fails, and online mode without an API key: warn once, train on."""
    broken = tmp_path / "broken"
    (broken / "wandb").mkdir(parents=True)
    (broken / "wandb" / "__init__.py").write_text("raise ImportError('this wandb install is broken')\n")
    import os

    env = {"PYTHONPATH": f"{broken}{os.pathsep}{ROOT}"}
    proc = launch(["train", *NO_WANDB, "logger.wandb.mode=offline", "train.max_steps=10", f"run.dir={run_dir}"], env=env)
    assert proc.stdout.count("cannot import wandb") == 1
    assert (run_dir / "summary.json").exists() and not (run_dir / "wandb").exists()

    home = tmp_path / "home"
    home.mkdir()
    other = tmp_path / "run2"
    proc = launch(["train", *NO_WANDB, "logger.wandb.mode=online", "train.max_steps=10", f"run.dir={other}"],
                  env={"HOME": str(home), "WANDB_API_KEY": ""})
    assert "no API key" in proc.stdout and "wandb sync" in proc.stdout
    assert len(offline_runs(other)) == 1


def test_progress_modes_and_results_tail(tmp_path):
    from launcher.files import JsonlTail
    from launcher.telemetry.progress import PlainProgress, RichProgress, make_progress

    assert type(make_progress("auto", 10, isatty=False)) is PlainProgress
    assert make_progress("off", 10).console is False
    bar = make_progress("auto", 10, isatty=True)
    assert isinstance(bar, RichProgress)
    bar.update({"step": 3, "epoch": 0, "loss": 1.0, "lr": 0.1, "samples_per_s": 5.0}, 2.0, None)
    bar.close()

    path = tmp_path / "results.jsonl"
    path.write_text('{"step": 1}\n')
    tail = JsonlTail(path, from_end=True)  # starts at the end: what was there is not logged again
    assert tail.read() == []
    with open(path, "a") as f:
        f.write('{"step": 2}\n{"step": 3, "metr')  # a writer mid-line
    assert tail.read() == [{"step": 2}]
    with open(path, "a") as f:
        f.write('ics": {}}\n')
    assert tail.read() == [{"step": 3, "metrics": {}}]


def test_nvml_names_a_cuda_device_as_a_gpu_or_a_mig_instance():
    """torch prints a CUDA device's UUID without NVML's prefix; with MIG on, the device is an instance
    whose NVML name starts "MIG-" (telemetry used to look up "GPU-" only, and turned off under MIG)."""
    from launcher.telemetry.gpu import nvml_uuids

    uuid = "3f8a2c1e-0b7d-4e55-9c2a-1d2e3f4a5b6c"
    assert nvml_uuids(uuid) == [f"GPU-{uuid}", f"MIG-{uuid}"]
    assert nvml_uuids(f"MIG-{uuid}") == [f"MIG-{uuid}"] and nvml_uuids(f"GPU-{uuid}") == [f"GPU-{uuid}"]
