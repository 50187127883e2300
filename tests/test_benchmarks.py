"""benchmarks/: the collector (run_all.py) and the bare DDP baseline the overhead benchmark compares against.
Speed itself is measured by the benchmarks (RESULTS.md), not asserted here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, child_env


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
