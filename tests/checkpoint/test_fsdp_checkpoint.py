"""Sharded (fsdp) checkpoints: atomic DCP directories, checksums, retention across both kinds, exact resume
after kill -9, resharding onto another number of ranks, and ddp <-> fsdp in both directions.

The multi-process tests run tests/support/fsdp_scripts/ckpt_train.py under real torchrun (gloo, CPU): a tiny model
fully_shard-ed per layer, AdamW, the real Checkpointer."""
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, child_env, free_port, read_jsonl
from launcher.checkpoint import dcp, store
from launcher.errors import SaveError

SCRIPT = ROOT / "tests" / "support" / "fsdp_scripts" / "ckpt_train.py"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one-process DCP says so
NO_DIST = SimpleNamespace(group=None, all_reduce=lambda t, op="sum": t, any_rank=bool)  # one process: collectives are identities


def torchrun(nproc: int, run: Path, *args: str, restarts: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={nproc}", f"--max-restarts={restarts}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(SCRIPT), str(run), *args]
    proc = subprocess.run(cmd, env=child_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def same(a: dict, b: dict) -> None:
    """Full final states (model, optimizer by name, EMA) bit-identical."""
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["state"].keys() == ob["state"].keys()
    for name in oa["state"]:
        for k, v in oa["state"][name].items():
            assert torch.equal(v, ob["state"][name][k]), (name, k)
    assert [{k: v for k, v in g.items() if k != "initial_lr"} for g in oa["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "initial_lr"} for g in ob["param_groups"]]


def events(run: Path, kind: str) -> list:
    return [e for e in read_jsonl(run / "events.jsonl") if e["event"] == kind]


# ------------------------------------------------------------------------------------ one process
def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(5, 3, generator=g)}, "scheduler": {"last_epoch": seed}}


def _dcp(directory: Path, step: int) -> Path:
    return store.save_sharded(directory, step, _state(step), {"rng": torch.tensor([step])},
                                   {"train": {"step": step, "epoch": 0, "batch_in_epoch": step}, "train_world": 1},
                                   NO_DIST, 0)


def test_sharded_dir_is_complete_checksummed_and_loads_whole(tmp_path):
    path = _dcp(tmp_path, 7)
    assert path.name == "step-00000007.dcp" and store.steps(tmp_path) == [7]
    manifest = dcp.verify(path)
    assert {".metadata", "rank-00000.pt"} <= set(manifest["files"]) and not list(tmp_path.glob("*.tmp"))
    data = store.load(store.path_for(tmp_path, 7))  # what the validator's re-validation reads
    assert torch.equal(data["model"]["w"], _state(7)["model"]["w"]) and data["step"] == 7
    assert dcp.own_parts(path, 0)["rng"].item() == 7


def test_incomplete_tmp_dir_is_never_loaded_and_is_cleaned_at_the_next_save(tmp_path):
    _dcp(tmp_path, 3)
    half = _dcp(tmp_path, 6)
    half.rename(half.with_name(half.name + ".tmp"))  # died before the rename: everything but the commit
    (half.with_name(half.name + ".tmp") / dcp.MANIFEST).unlink()
    assert store.steps(tmp_path) == [3]
    assert store.load_latest(tmp_path)[0].name == "step-00000003.dcp"
    _dcp(tmp_path, 9)
    assert not list(tmp_path.glob("*.tmp")) and store.steps(tmp_path) == [9, 3]


def test_corrupt_shard_is_skipped_with_a_reason(tmp_path):
    _dcp(tmp_path, 3)
    newest = _dcp(tmp_path, 6)
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    path, _, skipped = store.load_latest(tmp_path)
    assert path.name == "step-00000003.dcp"
    assert len(skipped) == 1 and "step-00000006.dcp" in skipped[0] and shard.name in skipped[0] and "checksum" in skipped[0]


def test_retention_counts_pt_files_and_dcp_dirs_alike(tmp_path):
    store.save(tmp_path, 1, {"step": 1})
    _dcp(tmp_path, 2)
    store.save(tmp_path, 3, {"step": 3})
    _dcp(tmp_path, 4)
    store.prune(tmp_path, keep_last=2, protect=[1])  # step 1: the best one, kept
    assert store.steps(tmp_path) == [4, 3, 1]
    assert not (tmp_path / "step-00000002.dcp").exists() and (tmp_path / "step-00000001.json").exists()
    store.save_sharded(tmp_path, 5, _state(5), {}, {"train": {}, "train_world": 1}, NO_DIST, 0)
    store.prune(tmp_path, keep_last=2)  # after that commit (Checkpointer.retain)
    assert store.steps(tmp_path) == [5, 4]
    store.save(tmp_path, 5, {"step": 5})  # the same step again, as a .pt: one per step
    assert store.steps(tmp_path) == [5, 4] and store.path_for(tmp_path, 5).suffix == ".pt"


def test_unwritable_directory_raises_save_error_and_keeps_the_rest(tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(SaveError, match="step-00000004.dcp"):
        _dcp(blocker, 4)


# ---------------------------------------------------------------------------------- torchrun, gloo
@pytest.mark.slow
def test_killed_then_resumed_under_max_restarts_is_bit_identical(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    torchrun(2, ref, "--steps", "8", "--every", "3", "--out", str(tmp_path / "ref.pt"))
    # Rank 0 SIGKILLs itself right after the step-6 checkpoint; torchrun restarts the group, which resumes.
    torchrun(2, run, "--steps", "8", "--every", "3", "--die-at", "6", "--out", str(tmp_path / "run.pt"), restarts=1)
    a, b = load(tmp_path / "ref.pt"), load(tmp_path / "run.pt")
    assert b["resumed"] and not a["resumed"] and b["step"] == 8
    assert [e["step"] for e in events(run, "resume")] == [6] and not events(run, "resume_world_changed")
    same(a, b)
    assert torch.equal(a["meter"], b["meter"])  # per-rank parts (the loss sum) came back too
    from safetensors.torch import load_file
    exported = load_file(run / "ema.safetensors")  # the sharded EMA, gathered into one deployable file
    assert exported.keys() == b["ema"].keys() and all(torch.equal(exported[k], b["ema"][k]) for k in exported)
    assert store.steps(run / "checkpoints") == [8, 6, 3]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_resharding_2_to_3_and_3_to_2_ranks_loads_the_same_full_state(tmp_path):
    run = tmp_path / "run"
    torchrun(2, run, "--steps", "4", "--every", "4", "--out", str(tmp_path / "two.pt"))
    # 3 ranks load the 2-rank checkpoint (same full state), train on to step 6 and save there.
    torchrun(3, run, "--steps", "6", "--loaded", str(tmp_path / "three.pt"), "--out", str(tmp_path / "three6.pt"))
    same(load(tmp_path / "two.pt"), load(tmp_path / "three.pt"))
    torchrun(2, run, "--steps", "6", "--loaded", str(tmp_path / "two6.pt"))  # load only: no step left
    same(load(tmp_path / "three6.pt"), load(tmp_path / "two6.pt"))
    assert [(e["saved"], e["now"]) for e in events(run, "resume_world_changed")] == [(2, 3), (3, 2)]
    assert [e["step"] for e in events(run, "resume")] == [4, 6]


@pytest.mark.slow
def test_ddp_checkpoint_into_fsdp_and_fsdp_checkpoint_into_ddp(tmp_path):
    run = tmp_path / "run"
    torchrun(2, run, "--strategy", "ddp", "--steps", "4", "--every", "4", "--out", str(tmp_path / "ddp.pt"))
    assert (run / "checkpoints" / "step-00000004.pt").exists()
    torchrun(3, run, "--strategy", "fsdp", "--steps", "6", "--loaded", str(tmp_path / "fsdp.pt"),
             "--out", str(tmp_path / "fsdp6.pt"))
    same(load(tmp_path / "ddp.pt"), load(tmp_path / "fsdp.pt"))
    assert (run / "checkpoints" / "step-00000006.dcp").is_dir()
    torchrun(2, run, "--strategy", "ddp", "--steps", "6", "--loaded", str(tmp_path / "ddp6.pt"))
    same(load(tmp_path / "fsdp6.pt"), load(tmp_path / "ddp6.pt"))
    assert [e["checkpoint"] for e in events(run, "resume")] == ["step-00000004.pt", "step-00000006.dcp"]


@pytest.mark.slow
def test_corrupt_shard_is_reported_and_the_previous_checkpoint_resumes_exactly(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    torchrun(2, ref, "--steps", "6", "--every", "3", "--out", str(tmp_path / "ref.pt"))
    shutil.copytree(ref, run)
    (run / "events.jsonl").unlink()
    shard = run / "checkpoints" / "step-00000006.dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    torchrun(2, run, "--steps", "6", "--every", "3", "--out", str(tmp_path / "run.pt"))
    [skip] = events(run, "checkpoint_skipped")
    assert "step-00000006.dcp" in skip["reason"] and "__1_0.distcp" in skip["reason"]
    assert [e["step"] for e in events(run, "resume")] == [3]
    same(load(tmp_path / "ref.pt"), load(tmp_path / "run.pt"))
    dcp.verify(run / "checkpoints" / "step-00000006.dcp")  # saved again, intact


@pytest.mark.slow
def test_rank_0_unable_to_write_makes_every_rank_raise_save_error_together(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(2, run, "--steps", "3", "--every", "2", "--blocked", check=False)
    assert proc.returncode != 0
    for rank in (0, 1):  # none left waiting in a collective: each got its SaveError
        assert "could not save checkpoint" in (run / f"save-error-{rank}.txt").read_text()
    assert "step-00000002.dcp" in (run / "save-error-1.txt").read_text()
