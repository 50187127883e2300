"""The sharded hand-off (issue 18, part B), with real torchrun ranks (gloo, CPU): every rank writes its
own shards, the snapshot appears only once all pieces are in, the validator assembles the full
tensors, rejects a snapshot with a corrupt or missing piece, and validates the sharded snapshot
exactly as it validates a ddp snapshot of the same weights."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, child_env, free_port, launch, read_jsonl
from launcher.files import Corrupt
from launcher.validation import handoff, handoff_shards
from tests.support.handoff import put

SCRIPT = Path(__file__).parent.parent / "support" / "fsdp_scripts" / "handoff_put.py"


def torchrun(nproc: int, run_dir: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(SCRIPT), f"--run-dir={run_dir}", *args]
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def assert_snapshot_is(q: Path, run: Path, step: int) -> None:
    """Claim `step` and compare every assembled tensor with the full one, bit for bit."""
    snap = handoff.claim(q, "all")
    assert snap is not None and snap.step == step
    manifest, states = snap.load()
    assert manifest.step == step and manifest.weights == ["ema"]
    full = load_file(str(run / f"full-{step}.safetensors"))
    assert sorted(f"ema/{k}" for k in states["ema"]) == sorted(full)
    for key, t in full.items():
        got = states["ema"][key.split("/", 1)[1]]
        assert got.dtype == t.dtype and torch.equal(got, t), key
    snap.ack()
    assert handoff.settled(q, step) and not handoff.data_files(q, step)[1:]


@pytest.mark.parametrize("nproc,state", [(2, "module"), (3, "synthetic")])
@pytest.mark.slow
def test_snapshot_appears_only_once_every_piece_is_in(tmp_path, nproc, state):
    """Rank 1 is held back: the other ranks' pieces are on disk but no manifest is; once rank 1 writes,
    the snapshot is committed (once), and it assembles to exactly the full tensors. A snapshot whose
    piece vanished is rejected as corrupt."""
    run, q = tmp_path / "run", tmp_path / "run" / "handoff"
    proc = torchrun(nproc, run, f"--state={state}", "--steps=10,20", "--hold-rank=1")
    try:
        others = [handoff_shards.piece_path(q, 10, r, nproc) for r in range(nproc) if r != 1]
        wait_for(lambda: all(p.exists() for p in others))
        time.sleep(1.0)  # time enough for a wrong commit to show up
        assert not handoff.manifest_path(q, 10).exists() and handoff.pending(q) == []
        assert not handoff.settled(q, 10)  # the trainer's drain waits for such a snapshot
        (run / "release").touch()
        out = finish(proc)
    finally:
        proc.kill()
    assert out.count("blocked_ms") == nproc
    assert handoff.pending(q) == [10, 20]
    assert not list(q.glob("*ticket*")) and not list(q.glob(".*"))  # tickets and temporaries are gone
    manifest = json.loads(handoff.manifest_path(q, 10).read_text())
    assert manifest["world"] == nproc and [p["rank"] for p in manifest["pieces"]] == list(range(nproc))
    assert_snapshot_is(q, run, 10)

    handoff_shards.piece_path(q, 20, nproc - 1, nproc).unlink()
    snap = handoff.claim(q, "all")
    with pytest.raises(Corrupt, match=f"piece of rank {nproc - 1} missing"):
        snap.load()
    snap.reject("missing piece")
    assert handoff.settled(q, 20) and handoff.manifest_path(q, 20, "bad").exists()
    assert [(r["step"], r["reason"]) for r in read_jsonl(run / "val" / "skipped.jsonl")] == [(20, "corrupt")]


@pytest.mark.slow
def test_latest_policy_drops_stale_sharded_snapshots_with_their_pieces(tmp_path):
    """policy=latest, keep=1: the rank that completes a snapshot drops the older unclaimed one, pieces and all."""
    run, q = tmp_path / "run", tmp_path / "run" / "handoff"
    finish(torchrun(2, run, "--steps=10,20,30", "--policy=latest", "--keep=1"))
    assert handoff.pending(q) == [30]
    assert sorted(p.name for p in q.iterdir()) == ["00000030.json", "00000030.shard-0-of-2.safetensors",
                                                    "00000030.shard-1-of-2.safetensors"]
    assert [(r["step"], r["reason"]) for r in read_jsonl(run / "val" / "skipped.jsonl")] == [(10, "stale"), (20, "stale")]
    assert_snapshot_is(q, run, 30)


def test_incomplete_leftovers_are_swept(tmp_path):
    """A rank that never wrote its piece (crash, out of memory): the step's other pieces go once a newer
    snapshot is complete, and a new session's rank-0 Writer removes a previous session's leftovers."""
    q = tmp_path / "handoff"
    q.mkdir(parents=True)
    for name in ("00000010.shard-0-of-2.safetensors", "00000010.ticket-0-of-2", "00000030.shard-1-of-2.safetensors",
                 "00000020.shard-0-of-2.safetensors", "00000020.json"):
        (q / name).write_text("x")
    handoff_shards.sweep(q, below=25)
    assert sorted(p.name for p in q.iterdir()) == ["00000020.json", "00000020.shard-0-of-2.safetensors",
                                                   "00000030.shard-1-of-2.safetensors"]
    handoff.Writer(tmp_path, "all", keep=2, rank=1, world=2).flush()
    assert (q / "00000030.shard-1-of-2.safetensors").exists()  # only rank 0 sweeps at startup
    handoff.Writer(tmp_path, "all", keep=2, rank=0, world=2).flush()
    assert sorted(p.name for p in q.iterdir()) == ["00000020.json", "00000020.shard-0-of-2.safetensors"]


@pytest.mark.slow
def test_validator_validates_sharded_snapshots_like_ddp_ones_and_skips_a_corrupt_piece(tmp_path):
    """The real `launcher validate` over one queue: a ddp snapshot of a run's EMA (step 100), the same
    weights as 2-rank sharded snapshots (200: one piece damaged after the commit, 300: intact). 200 is
    rejected (.bad, val/skipped.jsonl says which piece and why), 300 validates with exactly the metrics of 100."""
    run = tmp_path / "run"
    launch(["train", *FAST, f"run.dir={run}", "validation.mode=off", "train.max_steps=10",
            "checkpoint.every_steps=0"])
    weights = run / "ema.safetensors"
    w = handoff.Writer(run, "all", keep=2)
    put(w, 100, {"ema": load_file(str(weights))})
    w.flush()
    finish(torchrun(2, run, f"--state={weights}", "--steps=200,300", "--same"))
    q = run / "handoff"
    assert handoff.pending(q) == [100, 200, 300]
    piece = handoff_shards.piece_path(q, 200, 1, 2)
    data = bytearray(piece.read_bytes())
    data[-4] ^= 0xFF
    piece.write_bytes(bytes(data))

    proc = launch(["validate", f"run.dir={run}", "validation.policy=all"])
    rows = {r["step"]: r for r in read_jsonl(run / "val" / "results.jsonl")}
    assert sorted(rows) == [100, 300] and rows[300]["metrics"] == rows[100]["metrics"]
    skipped = {r["step"]: r for r in read_jsonl(run / "val" / "skipped.jsonl")}
    assert skipped[200]["reason"] == "corrupt" and "rank 1" in skipped[200]["detail"] \
        and "sha256" in skipped[200]["detail"]
    assert (q / (piece.name + ".bad")).exists() and handoff.manifest_path(q, 200, "bad").exists()
    assert "corrupt" in proc.stdout + proc.stderr
    assert not list(q.glob("*.safetensors"))  # validated snapshots left the queue


@pytest.mark.slow
def test_fsdp_trainer_side_hands_off_on_every_rank_and_the_spawned_validator_validates(tmp_path):
    """trainer_side.for_training under train.strategy=fsdp, driven like train.py by 2 torchrun ranks whose
    fully_shard-ed model stands in for the sharded EMA: rank 1 gets a ShardHandoff, rank 0 the async
    validation, which spawns the real validator (mode=process) and drains at the end. Every snapshot is
    validated with exactly the metrics of a ddp snapshot of the same weights; the stall is reported."""
    run = tmp_path / "run"
    launch(["train", *FAST, f"run.dir={run}", "validation.mode=off", "train.max_steps=10",
            "checkpoint.every_steps=0", "validation.policy=all"])
    w = handoff.Writer(run, "all", keep=2)
    put(w, 5, {"ema": load_file(str(run / "ema.safetensors"))})  # the ddp snapshot, validated first
    w.flush()
    script = Path(__file__).parent.parent / "support" / "fsdp_scripts" / "handoff_train.py"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(script), f"--run-dir={run}", "--steps=30",
                          "validation.mode=process", "validation.every_steps=10", "validation.policy=all"],
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "rank 1 ShardHandoff summary {}" in out.stdout
    summary = json.loads(out.stdout.split("rank 0 AsyncValidation summary ")[1].splitlines()[0])
    assert summary["validated_steps"] == 3 and summary["unvalidated_steps"] == [] and summary["stale_steps"] == []
    rows = {r["step"]: r for r in read_jsonl(run / "val" / "results.jsonl")}
    assert sorted(rows) == [5, 10, 20, 30]
    assert all(rows[s]["metrics"] == rows[5]["metrics"] for s in (10, 20, 30))
    blocked = [e["blocked_ms"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "handoff"]
    assert len(blocked) == 3 and summary["handoff_blocked_ms"]["max"] == pytest.approx(max(blocked), abs=1e-3)
    assert not list((run / "handoff").glob("*.safetensors")) and not list((run / "handoff").glob("*ticket*"))


def test_inline_validation_is_refused_under_fsdp():
    """Inline validation needs the full model on one rank: under fsdp it is a clear config error."""
    from types import SimpleNamespace

    from launcher.distributed.env import Env
    from launcher.validation import trainer_side
    from launcher.errors import ConfigError

    cfg = SimpleNamespace(train=SimpleNamespace(strategy="fsdp"), validation=SimpleNamespace(mode="inline"))
    env = Env(0, 2, 0, 2, 0, None, torch.device("cpu"), validation_mode="inline")
    with pytest.raises(ConfigError, match="validation.mode=inline is not supported with train.strategy=fsdp"):
        trainer_side.for_training(cfg, env, None, None, None, None, None, 8, None, None)


def _has_strategy() -> bool:
    import dataclasses

    from launcher.config import schema
    return "strategy" in {f.name for f in dataclasses.fields(schema.TrainConfig)}


@pytest.mark.slow
@pytest.mark.skipif(not _has_strategy(), reason="train.strategy (issue 18 part A) is not in this checkout")
def test_validator_rank_validates_an_fsdp_run_like_the_ddp_run(tmp_path):
    """3 ranks (2 train, 1 validates), the same run under ddp and fsdp: every snapshot of the sharded EMA
    reaches the validator rank, which gives the ddp run's results (the weights agree to 1e-5)."""
    rows = {}
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        launch(["train", *FAST, f"run.dir={run}", f"train.strategy={strategy}", "validation.mode=rank",
                "train.max_steps=30", "validation.every_steps=10", "validation.policy=all",
                "checkpoint.every_steps=0"], nproc=3)
        rows[strategy] = {r["step"]: r["metrics"] for r in read_jsonl(run / "val" / "results.jsonl")}
        summary = json.loads((run / "summary.json").read_text())
        assert summary["validated_steps"] == 3 and summary["unvalidated_steps"] == [], summary
        assert not list((run / "handoff").glob("*.safetensors")) and not list((run / "handoff").glob("*ticket*"))
    assert sorted(rows["fsdp"]) == sorted(rows["ddp"]) == [10, 20, 30]
    for step, metrics in rows["ddp"].items():
        assert rows["fsdp"][step] == pytest.approx(metrics, rel=1e-5, abs=1e-6), step
