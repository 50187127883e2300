"""Speed options (issue 9): the sync-free EMA gate, the persistent loader, DDP bucket
settings, torch.compile, and the benchmark collector. Speed itself is measured by
benchmarks/ (RESULTS.md), not asserted here; these tests check the options are correct."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import FAST, ROOT, child_env, final_weights, launch
from launcher.ema import EMA


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_ema_device_gate_is_the_host_path_without_a_sync():
    """A 0-d tensor `skip` (what train.py passes on a GPU) averages exactly like the host
    bool when the step is finite, leaves the average bit-exact when it is not (even with
    NaN weights), and settles the counters when they are read."""
    model, host_model = _model(0), _model(0)
    host, gated = EMA(host_model, 0.9, "exp", 3.0), EMA(model, 0.9, "exp", 3.0)
    for step in range(5):
        for m in (model, host_model):
            torch.manual_seed(step)
            m(torch.randn(6, 4))  # BatchNorm statistics and num_batches_tracked move
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
        host.update(host_model, skip=False)
        gated._update_gated(model, torch.tensor(False))  # what update() does with a GPU's flag
    for k in host.shadow:
        assert torch.equal(host.shadow[k], gated.shadow[k]), k
    assert gated.updates == host.updates == 5 and gated.skipped == 0

    before = {k: v.clone() for k, v in gated.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        model[1].num_batches_tracked.fill_(999)
    gated._update_gated(model, torch.tensor(True))
    gated.update(model, skip=torch.tensor(True))  # a flag already on the host is simply read
    for k, v in before.items():
        assert torch.equal(gated.shadow[k], v), k
    assert gated.updates == 5 and gated.skipped == 2
    assert gated.state_dict()["updates"] == 5 and gated.current_decay == host.current_decay


@pytest.mark.slow
def test_persistent_loader_resumes_mid_epoch_like_a_fresh_loader(tmp_path):
    """One DataLoader for the whole run (a persistent worker, prefetch), hard-killed mid-epoch
    and relaunched, ends bit-identical to a run with a fresh single-process loader per epoch
    that never stopped: same samples, same order, epoch after epoch, resume included."""
    args = [*FAST, "batch.size=128", "validation.mode=off", "checkpoint.every_steps=10"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    launch(["train", *args, f"run.dir={straight}", "data.workers=0"])
    workers = [*args, f"run.dir={broken}", "data.workers=1", "data.prefetch=3"]
    assert launch(["train", *workers, "debug.fail_at_step=40"], check=False).returncode != 0
    launch(["train", *workers])
    a, b = final_weights(straight), final_weights(broken)
    assert a["step"] == b["step"] == 62 and a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@pytest.mark.slow
def test_ddp_bucket_settings_two_ranks(tmp_path):
    """The ddp.* keys reach DDP and do not change the math: 2 ranks with other bucket settings
    end bit-identical to the defaults on CPU, with OOM recovery on (the default: DDP syncs inside the
    last backward either way) and ddp.static_graph, which recovery no longer rules out."""
    base = [*FAST, "train.epochs=1", "validation.mode=off", "ema.enabled=false"]
    default, tuned = tmp_path / "default", tmp_path / "tuned"
    launch(["train", *base, f"run.dir={default}"], nproc=2)
    launch(["train", *base, f"run.dir={tuned}", "ddp.static_graph=true", "ddp.gradient_as_bucket_view=false",
            "ddp.bucket_cap_mb=0.01"], nproc=2)
    a, b = final_weights(default), final_weights(tuned)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_bad_ddp_settings_exit_2(tmp_path):
    for bad, key in ((["ddp.bucket_cap_mb=0"], "ddp.bucket_cap_mb"), (["debug.simulate_oom_phase=sideways"],
                                                                      "debug.simulate_oom_phase")):
        proc = launch(["train", *FAST, f"run.dir={tmp_path / 'r'}", *bad], check=False)
        assert proc.returncode == 2 and key in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_compile_trains_and_keeps_checkpoint_keys(tmp_path):
    """train.compile=true compiles the forward in place: same state-dict keys in the checkpoint
    (so compiled and eager runs resume each other), and the same training up to float noise."""
    args = [*FAST, "train.epochs=0", "train.max_steps=8", "validation.mode=off", "ema.enabled=false"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    launch(["train", *args, f"run.dir={eager}"])
    launch(["train", *args, f"run.dir={compiled}", "train.compile=true"], timeout=600)
    a, b = final_weights(eager), final_weights(compiled)
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5)


def _run_all(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), *args], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=600)


def test_run_all_reports_tables_and_skips_what_is_missing(tmp_path):
    """RESULTS.md gets one table per valid JSON; a missing or malformed JSON becomes a note;
    text outside the generated block survives regeneration."""
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    out.mkdir()
    row = {"case": "resnet: x", "ours": 2.0, "baseline": 4.0, "baseline_name": "base", "ratio": 0.5,
           "unit": "ms", "target": 0.98, "met": False}
    (out / "ema.json").write_text(json.dumps({"benchmark": "ema", "device": "cpu", "date": "d", "rows": [row]}))
    (out / "autobatch.json").write_text("{not json")
    results.write_text("# Results\n\nHand-written prose.\n")
    for _ in range(2):
        proc = _run_all("--no-run", "--out-dir", str(out), "--results", str(results))
        assert proc.returncode == 0, proc.stderr
    text = results.read_text()
    assert text.startswith("# Results\n\nHand-written prose.\n") and text.count("run_all:begin") == 1
    assert "| resnet: x | 2 | 4 (base) | 0.5 | 0.98 | **no** | ms |" in text
    assert "`autobatch.json` is not valid JSON" in text and "no `scaling.json`" in text
    assert _run_all("--no-run", "--only", "nonsense", "--results", str(results)).returncode == 2


@pytest.mark.slow
def test_run_all_quick_overhead_writes_json_and_results(tmp_path):
    """The real overhead benchmark, CI-sized: launcher and bare loop both run and get timed."""
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    proc = _run_all("--quick", "--only", "overhead", "--out-dir", str(out), "--results", str(results),
                    "--args", "--models resnet --no-options --repeat 1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "overhead.json").read_text())
    assert data["benchmark"] == "overhead" and data["quick"] is True
    cases = {r["case"]: r for r in data["rows"]}
    vs_bare = cases["resnet: launcher train (EMA, validation, metrics) vs bare DDP loop"]
    assert vs_bare["ours"] > 0 and vs_bare["baseline"] > 0 and vs_bare["target"] == ">= 0.98"
    assert vs_bare["ratio"] == pytest.approx(vs_bare["ours"] / vs_bare["baseline"], rel=1e-3)
    assert isinstance(vs_bare["met"], bool)
    assert "### overhead" in results.read_text() and vs_bare["case"] in results.read_text()


def test_bare_ddp_baseline_needs_neither_the_launcher_nor_hydra(tmp_path):
    """benchmarks/bare_ddp.py (the baseline) runs on a bare box: torch and the job's model only (the
    `launcher` package root, which imports os, and launcher.jobs; no launcher module, Hydra or OmegaConf),
    batches kept on the device; it writes the two timing marks."""
    out = tmp_path / "marks.jsonl"
    job = json.dumps({"model": "resnet", "width": 8, "depth": [1, 1, 1, 1], "image_size": 16, "num_classes": 10})
    code = ("import runpy, sys\n"
            f"sys.argv = ['bare_ddp.py', '--job', {job!r}, '--batch', '4', '--steps', '3', '--warmup', '1',"
            f" '--precision', 'fp32', '--out', {str(out)!r}]\n"
            "runpy.run_path('benchmarks/bare_ddp.py', run_name='__main__')\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf')\n"
            "             or m.startswith('launcher.') and not m.startswith('launcher.jobs'))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in map(json.loads, out.read_text().splitlines())] == [1, 3]


def test_fp16_skip_is_read_from_the_scale_on_the_device(monkeypatch):
    """Issue 14 item 3: the EMA's fp16 skip compares the GradScaler's scale tensor before and after
    the step (on a GPU a device bool, no sync), never `get_scale()` (a host read every step)."""
    from launcher import step
    monkeypatch.setattr(torch.amp.GradScaler, "get_scale", lambda self: pytest.fail("get_scale() syncs"))
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=1)
    assert step.scale_of(torch.amp.GradScaler("cpu", enabled=False)) is None
    skipped = []
    for bad in (False, True, False):
        scaler.scale(model(torch.randn(6, 4)).sum()).backward()
        if bad:
            model[0].weight.grad.fill_(float("inf"))
        before = step.scale_of(scaler)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        skipped.append(step.scaler_skipped(scaler, before))
    assert skipped == [False, True, False]  # growth (every step here) is not a skip


@pytest.mark.parametrize("on", [False, True])  # the defaults last: the flags are global
def test_backend_flags_are_config_keys(on):
    """train.cudnn_benchmark and train.tf32, applied once by wrap.setup (with channels_last weights)."""
    from launcher.config.schema import TrainConfig
    from launcher.distributed import wrap
    model = wrap.setup(nn.Conv2d(3, 4, 3), TrainConfig(cudnn_benchmark=on, tf32=on, channels_last=on))
    assert torch.backends.cudnn.benchmark is on and torch.backends.cuda.matmul.allow_tf32 is on
    assert torch.backends.cudnn.allow_tf32 is on
    assert model.weight.is_contiguous(memory_format=torch.channels_last) is on
    assert TrainConfig().cudnn_benchmark and TrainConfig().tf32


def test_validator_loader_uses_workers_and_pinned_memory_on_a_gpu():
    """Issue 14 item 4: the evaluation DataLoader has worker processes (persistent) and pinned batches on
    a GPU by default; validation.workers sets the count (default -1: data.workers, at least 2 on a GPU)."""
    from launcher.data import eval_loader_options as loader_options
    from launcher.config.schema import Config
    cfg = Config()
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert loader_options(cfg, gpu) == {"num_workers": 2, "pin_memory": True, "persistent_workers": True}
    assert loader_options(cfg, cpu) == {"num_workers": 0, "pin_memory": False}
    cfg.data.workers = 8
    assert loader_options(cfg, gpu)["num_workers"] == loader_options(cfg, cpu)["num_workers"] == 8
    cfg.validation.workers, cfg.data.pin_memory = 0, False
    assert loader_options(cfg, gpu) == {"num_workers": 0, "pin_memory": False}
