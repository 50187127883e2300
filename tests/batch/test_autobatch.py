"""Auto batch size and runtime OOM recovery, exercised with real simulated OOMs on CPU.

`debug.simulate_oom_above` makes forward raise a real torch.OutOfMemoryError above a
size and `debug.simulate_oom_at_step` one in backward; everything else (probing,
agreement over gloo, recovery, resume) is the code that runs on a GPU.
"""
import json
import re
import time

import pytest
import torch
from torch import nn

from conftest import FAST, final_weights, launch, read_jsonl
from launcher.batch import probe
from launcher.batch.geometry import geometry
from tests.support.simulated_device import SimulatedDevice
from launcher.batch.recovery import is_oom
from launcher.config.schema import AutobatchConfig

QUICK = [*FAST, "validation.mode=off", "checkpoint.every_steps=0", "train.log_every=1"]


# --- the search, in process -------------------------------------------------------------------

def _oom_above(limit, calls):
    def trial(n):
        calls.append(n)
        if n > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {n} > {limit})")
    return trial


@pytest.mark.parametrize("limit", [1, 17, 64, 1000, 9999])
def test_search_finds_the_limit_within_the_margin_in_bounded_probes(limit):
    cfg = AutobatchConfig()
    calls = []
    memory = probe.DeviceMemory(torch.device("cpu"), cfg.fraction)
    out = probe.search(_oom_above(limit, calls), 64, cfg.max, cfg.max_probes, memory, cfg.margin)
    want = min(limit, cfg.max)
    assert len(out.probes) == len(calls) <= cfg.max_probes
    assert want * (1 - cfg.margin) ** 2 - 1 <= out.found  # search resolution + safety margin <= want, (out.found, calls)
    assert out.largest_ok <= want
    assert all(p.ok == (p.size <= limit) for p in out.probes)


class LinearMemory(probe.DeviceMemory):
    """A device whose peak memory is affine in the batch, like a real step; OOM at the total."""

    def __init__(self, fixed, per_sample, total, fraction):
        self.device, self.extra, self.cuda, self.alloc = torch.device("cpu"), 0, False, None
        self.fixed, self.per, self.total = fixed, per_sample, total
        self.limit, self.n = int(fraction * total), 0

    def peak(self):
        return self.fixed + self.per * self.n


def test_search_with_measured_memory_lands_under_the_fraction_quickly():
    # ResNet-50-like: 0.5 GiB fixed, 40 MiB per sample, 80 GiB device; OOM where memory runs out.
    mem = LinearMemory(512 << 20, 40 << 20, 80 << 30, 0.9)
    true_max = (mem.total - mem.fixed) // mem.per

    def trial(n):
        mem.n = n
        if mem.peak() > mem.total:
            raise torch.OutOfMemoryError("CUDA out of memory")
    out = probe.search(trial, 32, 4096, 10, mem, 0.05)
    assert mem.fixed + mem.per * out.found <= mem.limit  # under the fraction
    assert out.found >= 0.88 * true_max and len(out.probes) <= 6, (out.found, true_max, out.probes)


class StaleMeasurement(probe.DeviceMemory):
    """The probe before issue 13: reset the peak, keep the cache of earlier trials."""

    def start(self):
        self.alloc.reset_peak()


GiB = 1 << 30


def _h100_like(model: str) -> SimulatedDevice:
    """80 GiB, weights + AdamW + EMA, and per-sample activations that fit the H100 reference maxima."""
    params, per = {"resnet50": (25.6e6 * 4, 80 * GiB * 0.97 / 1856), "vitb16": (86.6e6 * 4, 80 * GiB * 0.97 / 1184)}[model]
    return SimulatedDevice(80 * GiB, 0.97, weights=params, fixed=4 * params, per_sample=per)


@pytest.mark.parametrize("model", ["resnet50", "vitb16"])
def test_probe_on_a_caching_allocator_measures_the_step_not_the_stale_cache(model):
    """Cached blocks of earlier trials stay reserved on a caching allocator. The old measurement read them
    (probe 2n saw R(n) + R(2n); after one trial over the limit every later one read over it) and settled far
    below the limit; emptying the cache before each trial lands at the limit in a few probes."""
    cfg = AutobatchConfig()
    sim = _h100_like(model)
    at_limit = max(n for n in range(1, cfg.max + 1) if sim.in_use + sim.fixed + sim.per_sample * n <= 0.9 * sim.total)
    out = probe.search(sim.step, 32, cfg.max, cfg.max_probes, probe.DeviceMemory(
        torch.device("cpu"), cfg.fraction, allocator=sim), cfg.margin)
    assert at_limit * (1 - cfg.margin / 2) <= out.found <= at_limit and sim.fits(out.found), (out.found, out.probes)
    assert len(out.probes) <= 6
    stale = probe.search(_h100_like(model).step, 32, cfg.max, cfg.max_probes, StaleMeasurement(
        torch.device("cpu"), cfg.fraction, allocator=_h100_like(model)), cfg.margin)
    assert stale.found < 0.9 * at_limit  # the simulated device does show the old flaw


def test_eval_probe_empties_the_cache_before_each_trial_too():
    class Job:
        def metrics(self, out, y):
            return {}

    sim = SimulatedDevice(16 * GiB, 0.97, weights=GiB, per_sample=8 << 20, layers=4)
    model = nn.Linear(4, 2)
    model.register_forward_pre_hook(lambda m, args: sim.step(len(args[0])))
    cfg = AutobatchConfig()
    at_limit = max(n for n in range(1, cfg.max + 1) if sim.in_use + sim.per_sample * n <= 0.9 * sim.total)
    memory = probe.DeviceMemory(torch.device("cpu"), cfg.fraction, allocator=sim)
    out = probe.probe_eval_batch(model, Job(), [(torch.randn(4), 0)], torch.device("cpu"), cfg, start=64,
                                     memory=memory)
    assert at_limit * (1 - cfg.margin / 2) <= out.found <= at_limit, (at_limit, out.probes)


def test_start_that_does_not_fit_goes_down_and_nothing_fits_is_zero():
    memory = probe.DeviceMemory(torch.device("cpu"), 0.9)
    assert probe.search(_oom_above(5, []), 64, 4096, 10, memory, 0.0).found == 5
    assert probe.search(_oom_above(0, []), 64, 4096, 10, memory, 0.05).found == 0


def test_oom_forms_are_recognized_and_other_errors_are_not():
    """The real texts torch, cuBLAS, cuDNN, HIP and the CPU allocator give for a failed allocation are OOMs;
    a missing cuDNN kernel (NOT_SUPPORTED, no engine) or an illegal access is a bug, not memory."""
    assert is_oom(torch.OutOfMemoryError("x"))
    oom = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
           "1.02 GiB is free. Including non-PyTorch memory, this process has 78.07 GiB memory in use.",
           "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call",
           "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
           "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
           "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 107374182400 bytes. Error code 12 (Cannot allocate memory)",
           "HIP out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total capacity of 63.98 GiB")
    for msg in oom:
        assert is_oom(RuntimeError(msg)), msg
    not_oom = ("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous "
               "input.", "GET was unable to find an engine to execute this computation",
               "CUDA error: an illegal memory access was encountered",
               "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, "
               "&alpha, a, lda, b, ldb, &beta, c, ldc)`",
               "cuDNN error: CUDNN_STATUS_BAD_PARAM")
    for msg in not_oom:
        assert not is_oom(RuntimeError(msg)), msg
    assert not is_oom(ValueError("CUDA out of memory"))  # only RuntimeErrors carry allocator messages


def test_geometry_keeps_the_step_batch_and_cuts_it_evenly():
    b = geometry(22, 128, 2)  # 64 per rank, at most 22 per micro-batch
    assert (b.step_samples, b.accum, b.micro, b.global_size) == (64, 3, 22, 128)
    b = b.halved()  # what recovery does
    assert (b.step_samples, b.accum, b.global_size) == (64, 6, 128)
    assert geometry(40, None, 3).global_size == 120


def test_the_start_lines_cut_is_arithmetically_true_also_after_an_uneven_halving():
    """Batch.describe (the start line's "micro x accum = batch"): every product it prints adds up to the batch,
    the ranks included; a cut that does not divide names its last, smaller micro-batch (100 = 13 x 7 + 9)."""
    assert geometry(16, 64, 2).describe() == "micro-batch 16 x accum 2 x 2 ranks = batch 64"
    assert geometry(32, None, 1).describe() == "micro-batch 32 x accum 1 = batch 32"
    halved = geometry(25, 100, 1).halved()  # 25 x 4 -> 13: seven micro-batches of 13 and one of 9
    assert (halved.micro, halved.accum) == (13, 8)
    assert halved.describe() == "micro-batches 13 x 7 + 9 = batch 100" and 13 * 7 + 9 == 100
    assert geometry(25, 200, 2).halved().describe() == "(micro-batches 13 x 7 + 9) x 2 ranks = batch 200"
    for micro in range(1, 40):  # whatever the cut, the printed arithmetic holds
        for world in (1, 3):
            b = geometry(micro, 96 * world, world, exact=96 % micro == 0).halved()
            cut, total = b.describe().split(" = batch ")
            terms = cut.replace("micro-batches ", "").replace("micro-batch ", "").replace("accum ", "")
            value = eval(terms.replace(" ranks", "").replace("x", "*"))  # noqa: S307 - our own digits and operators
            assert value == int(total) == b.global_size, b.describe()


def test_eval_probe_finds_the_limit_without_gradients_and_leaves_the_model_alone():
    class Job:
        def metrics(self, out, y):
            return {"acc": (out.argmax(-1) == y).sum()}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(8), 1)]
    rng = torch.get_rng_state()
    cfg = AutobatchConfig()
    out = probe.probe_eval_batch(model, Job(), data, torch.device("cpu"), cfg, start=16, simulate=300)
    assert 300 * (1 - cfg.margin) ** 2 - 1 <= out.found <= 300 and len(out.probes) <= cfg.max_probes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert not model._forward_pre_hooks  # the simulation is gone with the probe
    # On CPU with no simulated limit there is nothing to measure: the start size is the answer.
    assert probe.probe_eval_batch(model, Job(), data, torch.device("cpu"), cfg, start=16).found == 16


# --- real runs ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_auto_probes_once_resume_reuses_it_and_the_run_equals_a_fixed_size_run(tmp_path):
    auto, fixed = tmp_path / "auto", tmp_path / "fixed"
    args = [*QUICK, "batch.size=auto", "debug.simulate_oom_above=40", "train.max_steps=8", "checkpoint.every_steps=4",
            "debug.fail_at_step=4", f"run.dir={auto}"]
    assert launch(["train", *args], check=False).returncode == 13  # killed hard after the step-4 checkpoint
    record = json.loads((auto / "autobatch.json").read_text())
    probes = record["per_rank"][0]["probes"]
    assert record["reason"] == "probed" and len(probes) <= 10
    assert 40 * 0.95 - 1 <= record["micro_batch"] <= 40
    assert {p["size"] for p in probes if not p["ok"]} and all(p["ok"] == (p["size"] <= 40) for p in probes)
    assert all({"size", "peak_bytes", "ok", "seconds"} <= p.keys() for p in probes)
    event = [e for e in read_jsonl(auto / "events.jsonl") if e["event"] == "autobatch"][0]
    assert event["micro_batch"] == record["micro_batch"] and not event["cached"]
    assert event["curve"] == [[[p["size"], p["peak_bytes"], p["ok"], p["seconds"]] for p in probes]]
    assert "autobatch probe: micro-batch 64 OOM" in (auto / "logs" / "rank-0.log").read_text()
    assert f"all ranks agree on {record['micro_batch']}" in (auto / "logs" / "rank-0.log").read_text()

    # Resume: the cached choice, no probing.
    launch(["train", *args])
    events = [e for e in read_jsonl(auto / "events.jsonl") if e["event"] == "autobatch"]
    assert [e["cached"] for e in events] == [False, True] and events[1]["micro_batch"] == record["micro_batch"]
    assert (auto / "logs" / "rank-0.log").read_text().count("all ranks agree") == 1

    # Probing left no trace: weights, optimizer, EMA and RNG are as in a run started with that size.
    launch(["train", *QUICK, f"batch.size={record['micro_batch']}", "train.max_steps=8", f"run.dir={fixed}"])
    a, b = final_weights(auto), final_weights(fixed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k


def test_cpu_without_a_simulated_limit_uses_the_jobs_default(tmp_path):
    from launcher import jobs
    from launcher.cli import load_config
    from launcher.distributed.groups import Dist
    from launcher.distributed.env import detect
    from launcher.rundir import RunDir

    cfg, _ = load_config(["job.model=mlp", "batch.size=auto", "batch.global_size=256", "train.device=cpu"])
    env = detect(device="cpu")
    job = jobs.load(cfg.job)
    choice = probe.choose(cfg, env, Dist(env), RunDir(tmp_path), job.model(), job, None, "fp32", trial=None)
    batch, event = choice.batch, choice.event
    assert (batch.micro, batch.accum, batch.step_samples) == (64, 4, 256) and "default" in event["reason"]
    assert json.loads((tmp_path / "autobatch.json").read_text())["micro_batch"] == 64


@pytest.mark.slow
def test_two_ranks_with_different_limits_agree_on_the_minimum(run_dir):
    launch(["train", *QUICK, "batch.size=auto", "batch.global_size=128", "debug.simulate_oom_above=[40,24]",
            "train.max_steps=2", f"run.dir={run_dir}"], nproc=2)
    record = json.loads((run_dir / "autobatch.json").read_text())
    found = [r["found"] for r in record["per_rank"]]
    assert 38 <= found[0] <= 40 and 22 <= found[1] <= 24 and record["found"] == min(found)
    # 64 samples per rank per step, cut evenly into micro-batches no larger than the minimum.
    assert record["step_batch"] == 64 and record["micro_batch"] <= min(found)
    assert record["micro_batch"] * record["accum"] >= 64 and record["global_batch"] == 128
    micro, accum = record["micro_batch"], record["accum"]
    rest = 64 - micro * (accum - 1)  # the last micro-batch of the cut: the start line says what it is
    cut = f"micro-batch {micro} x accum {accum} x 2 ranks" if rest == micro else \
        f"(micro-batches {micro} x {accum - 1} + {rest}) x 2 ranks"
    assert 0 < rest <= micro and (micro * (accum - 1) + rest) * 2 == 128
    for r in (0, 1):
        log = (run_dir / "logs" / f"rank-{r}.log").read_text()
        assert f"all ranks agree on {record['found']}" in log
        assert f"{cut} = batch 128" in log


@pytest.mark.slow
def test_runtime_oom_on_one_rank_in_forward_and_backward_is_recovered_on_both(tmp_path):
    """Rank 1 only: forward OOM at step 1 (micro 32 > 16), backward OOM at step 3. Both ranks redo the
    step with half the micro-batch; the result equals a run with micro-batch 8 from the start."""
    oom, ref = tmp_path / "oom", tmp_path / "ref"
    common = [*QUICK, "batch.global_size=128", "train.max_steps=5"]
    launch(["train", *common, "batch.size=32", "debug.simulate_oom_above=[1000,16]", "debug.simulate_oom_at_step=3",
            f"run.dir={oom}"], nproc=2)
    launch(["train", *common, "batch.size=8", f"run.dir={ref}"], nproc=2)
    retries = [e for e in read_jsonl(oom / "events.jsonl") if e["event"] == "oom_retry"]
    assert [(e["step"], e["phase"], e["ranks"], e["micro_from"], e["micro_to"], e["accum"], e["step_batch"])
            for e in retries] == [(0, "forward", [1], 32, 16, 4, 64), (2, "backward", [1], 16, 8, 8, 64)]
    assert "out of memory in forward on this rank" in (oom / "logs" / "rank-1.log").read_text()
    for r in (0, 1):  # every rank redid both steps
        assert (oom / "logs" / f"rank-{r}.log").read_text().count("redoing it with micro-batch") == 2
    summary = json.loads((oom / "summary.json").read_text())
    assert (summary["steps"], summary["micro_batch"], summary["accum"], summary["global_batch"]) == (5, 8, 8, 128)
    a, b = final_weights(oom)["model"], final_weights(ref)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    record = json.loads((oom / "autobatch.json").read_text())
    assert record["micro_batch"] == 8 and len(record["oom_retries"]) == 2  # what a resume would use


@pytest.mark.slow
def test_oom_at_micro_batch_one_ends_with_a_clear_error_on_every_rank_without_hanging(run_dir):
    """An OOM in forward (before the step's agreement) at micro-batch 1: every rank gives up together.
    (Adapted for issue 14: with accumulation 1 the only backward is the last one, which now runs DDP's
    all-reduce; the OOM is put in forward to keep this test's subject, every rank saying why.)"""
    t0 = time.monotonic()
    proc = launch(["train", *QUICK, "batch.size=1", "debug.simulate_oom_at_step=2", "debug.simulate_oom_phase=forward",
                   "train.max_steps=4", f"run.dir={run_dir}"], nproc=2, check=False, timeout=180)
    assert proc.returncode != 0 and time.monotonic() - t0 < 170
    assert "giving up at micro-batch 1" in proc.stdout + proc.stderr
    for r in (0, 1):
        assert "giving up at micro-batch 1" in (run_dir / "logs" / f"rank-{r}.log").read_text()
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")].count("oom_giveup") == 1


@pytest.mark.slow
def test_oom_inside_the_last_backward_at_micro_batch_one_gives_up_without_hanging(run_dir):
    """Inside the last backward the other rank waits in DDP's all-reduce: the OOM rank gives up alone
    (status 1, not the restart status: there is nothing to halve) and the group is torn down at once."""
    t0 = time.monotonic()
    proc = launch(["train", *QUICK, "batch.size=1", "debug.simulate_oom_at_step=2", "train.max_steps=4",
                   "debug.simulate_oom_phase=last_backward", f"run.dir={run_dir}"], nproc=2, check=False, timeout=180)
    assert proc.returncode != 0 and time.monotonic() - t0 < 170
    assert "giving up at micro-batch 1" in (run_dir / "logs" / "rank-1.log").read_text()
    assert "exitcode: 75" not in proc.stderr.replace("exitcode : ", "exitcode: ")
    giveup = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "oom_giveup"]
    assert [(e["phase"], e["ranks"]) for e in giveup] == [("last backward", [1])]


def _reference(tmp_path, common, micro, nproc=2):
    ref = tmp_path / f"ref-{micro}"
    launch(["train", *common, f"batch.size={micro}", f"run.dir={ref}"], nproc=nproc)
    return final_weights(ref)["model"]


def _assert_close(run, ref):
    a = final_weights(run)["model"]
    for k in a:
        torch.testing.assert_close(a[k], ref[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_oom_inside_the_last_backward_exits_75_and_torchrun_resumes_with_the_halved_batch(tmp_path):
    """Rank 1 runs out of memory late inside step 3's last backward (DDP's all-reduces launched, rank 0
    waiting in them). Rank 1 records micro-batch 32 -> 16 in autobatch.json and exits 75; torchrun ends
    rank 0 and restarts the group, which resumes from the step-2 checkpoint with micro-batch 16."""
    run = tmp_path / "run"
    common = [*QUICK, "batch.global_size=128", "train.max_steps=5"]
    t0 = time.monotonic()
    proc = launch(["train", *common, "batch.size=32", "checkpoint.every_steps=2", "debug.simulate_oom_at_step=3",
                   "debug.simulate_oom_phase=last_backward", f"run.dir={run}"], nproc=2, timeout=240,
                  torchrun_args=["--max-restarts=1"])
    assert time.monotonic() - t0 < 230
    assert "exitcode: 75" in proc.stderr.replace("exitcode : ", "exitcode: ")
    events = read_jsonl(run / "events.jsonl")
    restart = [e for e in events if e["event"] == "oom_restart"]
    assert [(e["step"], e["rank"], e["micro_from"], e["micro_to"], e["exit_code"]) for e in restart] == \
        [(2, 1, 32, 16, 75)]
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    assert not [e for e in events if e["event"] == "oom_retry"]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["micro_batch"], summary["accum"], summary["global_batch"]) == (5, 16, 4, 128)
    record = json.loads((run / "autobatch.json").read_text())
    assert record["micro_batch"] == 16 and record["oom_retries"][0]["restart"] is True
    assert "exiting with status 75" in (run / "logs" / "rank-1.log").read_text()
    _assert_close(run, _reference(tmp_path, common, 16))


@pytest.mark.slow
def test_too_little_memory_for_the_last_backward_is_agreed_and_redone_in_place_with_static_graph(tmp_path):
    """Rank 1 reports at step 2 that its free memory is below the backward headroom (the agreement's second
    question); after a forward OOM at step 1 (the first, graph-recording iteration of ddp.static_graph).
    Both ranks redo each step with half the micro-batch; the result equals a run at micro-batch 8."""
    run = tmp_path / "run"
    common = [*QUICK, "batch.global_size=128", "train.max_steps=4"]
    launch(["train", *common, "batch.size=32", "ddp.static_graph=true", "debug.simulate_oom_above=[1000,16]",
            "debug.simulate_oom_at_step=2", "debug.simulate_oom_phase=headroom", f"run.dir={run}"], nproc=2)
    retries = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "oom_retry"]
    assert [(e["step"], e["phase"], e["ranks"], e["micro_from"], e["micro_to"]) for e in retries] == \
        [(0, "forward", [1], 32, 16), (1, "headroom", [1], 16, 8)]
    _assert_close(run, _reference(tmp_path, common, 8))


def test_recovery_gives_up_after_max_retries(run_dir):
    proc = launch(["train", *QUICK, "batch.size=64", "debug.simulate_oom_above=3", "autobatch.max_retries=2",
                   f"run.dir={run_dir}"], check=False)
    assert proc.returncode != 0
    assert "giving up after autobatch.max_retries=2" in proc.stdout + proc.stderr
    retries = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "oom_retry"]
    assert [(e["micro_from"], e["micro_to"]) for e in retries] == [(64, 32), (32, 16)]


@pytest.mark.slow
def test_validator_process_probes_its_own_eval_batch(tmp_path):
    """validation.batch_size=auto: the validator (a separate process here) probes forward-only on its
    own device; with a simulated limit of 300 samples it must land just under it."""
    run = tmp_path / "run"
    launch(["train", *FAST, "train.epochs=1", "validation.mode=process", "validation.batch_size=auto",
            "debug.simulate_oom_above=300", f"run.dir={run}"])
    text = (run / "logs" / "rank-validator.log").read_text()
    found = int(re.search(r"validation.batch_size=auto: (\d+)", text).group(1))
    assert 250 <= found <= 300, text
    assert read_jsonl(run / "val" / "results.jsonl"), "the validator validated with the probed batch"
