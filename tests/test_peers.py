"""benchmarks/peers.py (issue 26): the same task through the launcher, PyTorch Lightning, HF Accelerate and a
plain PyTorch loop. The quick run must give every system a row with finite figures; without the peers
(`pip install -e ".[peers]"`) the test skips.

The peers are looked up, not imported: Lightning and timm import torchvision, which fails beside the
CPU-only torch until the images job's fix is applied (the peer scripts apply it); the scripts run them
in their own processes anyway."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, child_env

PEERS = ("lightning", "accelerate", "timm")
SYSTEMS = ("launcher", "lightning", "accelerate", "plain")


@pytest.mark.slow
def test_peers_quick_gives_every_system_a_finite_row(tmp_path):
    absent = [name for name in PEERS if importlib.util.find_spec(name) is None]
    if absent:
        pytest.skip(f"peers not installed ({', '.join(absent)}): pip install -e '.[peers]'")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick"], cwd=ROOT,
                          env=child_env({"BENCH_OUT": str(tmp_path)}), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "peers.json").read_text())
    assert data["benchmark"] == "peers" and data["quick"] is True
    assert not [n for n in data["notes"] if "skipped" in n or "differs" in n], data["notes"]
    for task in ("mnist1d", "val-heavy"):
        results = data["results"][task]
        assert tuple(results) == SYSTEMS
        for system, r in results.items():
            for key in ("wall_s", "train_s", "train_cpu_s", "rate", "val_stall_ms", "final", "best", "cpu_s"):
                assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, (task, system, key, r)
            assert r["validations"] >= 1 and r["threads"] == 1, (task, system, r)
            assert math.isfinite(r["ckpt_stall_ms"]) and r["checkpoints"] >= 1, (task, system, r)  # the launcher's:
            assert not r.get("ckpt_estimated"), (task, system, r)  # its events' blocked_ms, not an estimate
        peers = {row["baseline_name"] for row in data["rows"] if row["case"].startswith(f"{task}:")}
        assert peers == {"PyTorch Lightning", "HF Accelerate", "plain PyTorch loop"}
    assert "| launcher |" in (tmp_path / "peers.md").read_text()
