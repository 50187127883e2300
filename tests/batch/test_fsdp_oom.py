"""batch.size=auto and runtime OOM recovery under train.strategy=fsdp, with the agreement rules of ddp
(tests/batch/test_autobatch.py): real simulated OOMs on CPU, real torchrun with gloo.

Under fsdp the step's forwards and backwards run collectives (all-gather, reduce-scatter); the launcher
gathers the parameters up front so that nothing before the last backward does, and probes in lockstep.
A hang here would be the failure: every launch has a timeout."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, ROOT, child_env, free_port, launch, read_jsonl

# ema.tau=1e9: the EMA's decay stays ~0, so the exported ema.safetensors is the final weights.
QUICK = [*FAST, "validation.mode=off", "checkpoint.every_steps=0", "train.log_every=1", "train.strategy=fsdp",
         "ema.tau=1e9"]


def _weights(run):
    return load_file(str(run / "ema.safetensors"))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_runtime_oom_on_one_rank_in_forward_and_backward_is_recovered_in_place_under_fsdp(tmp_path):
    """Rank 1 only: forward OOM at step 1 (micro 32 > 16), OOM in the first (non-last) backward at step 3.
    Both ranks redo each step with half the micro-batch; the weights equal an fsdp run at micro-batch 8."""
    oom, ref = tmp_path / "oom", tmp_path / "ref"
    common = [*QUICK, "batch.global_size=128", "train.max_steps=5"]
    launch(["train", *common, "batch.size=32", "debug.simulate_oom_above=[1000,16]", "debug.simulate_oom_at_step=3",
            f"run.dir={oom}"], nproc=2, timeout=240)
    launch(["train", *common, "batch.size=8", f"run.dir={ref}"], nproc=2, timeout=240)
    retries = [e for e in read_jsonl(oom / "events.jsonl") if e["event"] == "oom_retry"]
    assert [(e["step"], e["phase"], e["ranks"], e["micro_from"], e["micro_to"], e["accum"]) for e in retries] == \
        [(0, "forward", [1], 32, 16, 4), (2, "backward", [1], 16, 8, 8)]
    for r in (0, 1):
        assert (oom / "logs" / f"rank-{r}.log").read_text().count("redoing it with micro-batch") == 2
    summary = json.loads((oom / "summary.json").read_text())
    assert (summary["steps"], summary["micro_batch"], summary["accum"]) == (5, 8, 8)
    _assert_same_weights(oom, ref)


@pytest.mark.slow
def test_too_little_memory_for_the_last_backward_is_agreed_and_redone_in_place_under_fsdp(tmp_path):
    """A forward OOM at step 1, then at step 2 rank 1 reports its free memory below the backward headroom
    (the agreement's second question, asked before the last backward's reduce-scatters)."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    common = [*QUICK, "batch.global_size=128", "train.max_steps=4"]
    launch(["train", *common, "batch.size=32", "debug.simulate_oom_above=[1000,16]", "debug.simulate_oom_at_step=2",
            "debug.simulate_oom_phase=headroom", f"run.dir={run}"], nproc=2, timeout=240)
    launch(["train", *common, "batch.size=8", f"run.dir={ref}"], nproc=2, timeout=240)
    retries = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "oom_retry"]
    assert [(e["step"], e["phase"], e["ranks"], e["micro_from"], e["micro_to"]) for e in retries] == \
        [(0, "forward", [1], 32, 16), (1, "headroom", [1], 16, 8)]
    _assert_same_weights(run, ref)


@pytest.mark.slow
def test_batch_size_auto_under_fsdp_probes_in_lockstep_and_agrees_on_the_minimum(tmp_path):
    """Limits 40 and 24: every rank tries the same sizes (the trial all-gathers and reduce-scatters, so
    they must), a size fits only where it fits on both, and training runs with the agreed micro-batch
    from the weights the probe found (restored): the same as a fixed micro-batch of 32."""
    run_dir, ref = tmp_path / "auto", tmp_path / "ref"
    common = [*QUICK, "batch.global_size=128", "train.max_steps=2"]
    launch(["train", *common, "batch.size=auto", "debug.simulate_oom_above=[40,24]", f"run.dir={run_dir}"],
           nproc=2, timeout=240)
    launch(["train", *common, "batch.size=32", f"run.dir={ref}"], nproc=2, timeout=240)
    _assert_same_weights(run_dir, ref)
    record = json.loads((run_dir / "autobatch.json").read_text())
    sizes = [[p["size"] for p in r["probes"]] for r in record["per_rank"]]
    assert sizes[0] == sizes[1]  # lockstep
    assert all(p["fits"] == (p["size"] <= 24) for r in record["per_rank"] for p in r["probes"])
    assert 20 <= record["found"] <= 24 and record["micro_batch"] <= record["found"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


def _probe_with_an_oom(tmp_path, where: str) -> list:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(ROOT / "tests" / "support" / "fsdp_scripts" / "probe_oom.py"),
                           "--out", str(tmp_path), "--where", where, "--limit", "20"],
                          env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, "\n".join(ln for ln in proc.stderr.splitlines() if "rank1" in ln)[-4000:]
    return [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_a_real_oom_in_the_fsdp_probes_backward_is_agreed_on_by_both_ranks_without_a_hang(tmp_path):
    """The probe's trial synchronizes no gradient and agrees after its backward: rank 1 running out of memory
    there fails the size on both ranks, which go on probing in lockstep and agree on the largest size that
    fits on both, instead of rank 0 waiting in a reduce-scatter rank 1 never issues."""
    rows = _probe_with_an_oom(tmp_path, "backward")
    assert [r["found"] for r in rows] == [20, 20]
    assert rows[0]["probes"] == rows[1]["probes"]  # the same sizes, the same verdicts, on both ranks
    assert [size for size, ok, _ in rows[0]["probes"] if not ok] and \
        all(size > 20 for size, ok, _ in rows[0]["probes"] if not ok)


@pytest.mark.slow
def test_a_real_oom_in_the_fsdp_probes_all_gather_ends_the_probe_on_both_ranks(tmp_path):
    """A failed up-front all-gather on rank 1 is agreed on (after the gather), and both ranks end the probe
    with the same clear error: the whole parameters do not fit at any micro-batch."""
    rows = _probe_with_an_oom(tmp_path, "unshard")
    assert [r.get("found") for r in rows] == [None, None]
    assert all("gathering the parameters whole" in r["error"] and "unshard" in r["error"] for r in rows)
