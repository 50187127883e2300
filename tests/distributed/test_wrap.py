"""launcher/distributed/wrap.py: the backend flags, the DDP wrapper's ddp.* settings and torch.compile,
each checked where it is built and end to end."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FAST, final_weights, launch


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank, in this process (DDP needs one)."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield tdist.group.WORLD
    finally:
        tdist.destroy_process_group()


def test_the_ddp_keys_reach_the_ddp_the_loop_calls_and_compile_compiles_it_in_place(one_rank_group):
    """wrap.for_loop builds the module the loop calls: a DDP with ddp.bucket_cap_mb, ddp.static_graph and
    ddp.gradient_as_bucket_view as configured (the defaults otherwise), compiled in place with train.compile
    (the same module, so state-dict keys and no_sync() stay; the compiled forward is DDP's own)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from launcher.config.schema import Config
    from launcher.distributed import wrap

    cfg = Config()
    cfg.ddp.bucket_cap_mb, cfg.ddp.static_graph, cfg.ddp.gradient_as_bucket_view = 0.01, True, False
    model = nn.Linear(4, 2)
    tuned = wrap.for_loop(model, cfg, one_rank_group, torch.device("cpu"))
    assert isinstance(tuned, DDP) and tuned.module is model
    assert tuned.bucket_bytes_cap == int(0.01 * 1024 * 1024) and tuned.static_graph and not tuned.gradient_as_bucket_view
    assert tuned._compiled_call_impl is None  # train.compile off: eager
    default = wrap.for_loop(nn.Linear(4, 2), Config(), one_rank_group, torch.device("cpu"))
    assert default.bucket_bytes_cap == int(Config().ddp.bucket_cap_mb * 1024 * 1024)
    assert default.static_graph is Config().ddp.static_graph and default.gradient_as_bucket_view is True
    cfg.train.compile = True
    compiled = wrap.for_loop(model, cfg, one_rank_group, torch.device("cpu"))
    assert isinstance(compiled, DDP) and compiled._compiled_call_impl is not None  # compiled, in place (lazily)
    assert compiled.state_dict().keys() == default.state_dict().keys()
    alone = wrap.for_loop(nn.Linear(4, 2), cfg, None, torch.device("cpu"))  # no training group: the model itself
    assert not isinstance(alone, DDP) and alone._compiled_call_impl is not None


@pytest.mark.slow
def test_ddp_bucket_settings_do_not_change_the_math_on_two_ranks(tmp_path):
    """Other ddp.* settings do not change the math: 2 ranks with other bucket settings end bit-identical
    to the defaults on CPU, with OOM recovery on (the default: DDP syncs inside the last backward either
    way) and ddp.static_graph, which recovery no longer rules out (that the keys reach DDP is checked
    above)."""
    base = [*FAST, "train.epochs=1", "validation.mode=off", "ema.enabled=false"]
    default, tuned = tmp_path / "default", tmp_path / "tuned"
    launch(["train", *base, f"run.dir={default}"], nproc=2)
    launch(["train", *base, f"run.dir={tuned}", "ddp.static_graph=true", "ddp.gradient_as_bucket_view=false",
            "ddp.bucket_cap_mb=0.01"], nproc=2)
    a, b = final_weights(default), final_weights(tuned)
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_bad_ddp_settings_exit_2(tmp_path):
    for bad, key in ((["ddp.bucket_cap_mb=0"], "ddp.bucket_cap_mb"), (["debug.simulate_oom_phase=sideways"],
                                                                      "debug.simulate_oom_phase")):
        proc = launch(["train", *FAST, f"run.dir={tmp_path / 'r'}", *bad], check=False)
        assert proc.returncode == 2 and key in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_compile_trains_and_keeps_checkpoint_keys(tmp_path):
    """train.compile=true trains: same state-dict keys in the checkpoint (so compiled and eager runs resume
    each other), and the same training up to float noise (that it compiles: checked above)."""
    args = [*FAST, "train.epochs=0", "train.max_steps=8", "validation.mode=off", "ema.enabled=false"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    launch(["train", *args, f"run.dir={eager}"])
    launch(["train", *args, f"run.dir={compiled}", "train.compile=true"], timeout=600)
    a, b = final_weights(eager), final_weights(compiled)
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("on", [False, True])  # the defaults last: the flags are global
def test_backend_flags_are_config_keys(on):
    """train.cudnn_benchmark and train.tf32, applied once by wrap.prepare (with channels_last weights)."""
    from launcher.config.schema import TrainConfig
    from launcher.distributed import wrap
    model = wrap.prepare(nn.Conv2d(3, 4, 3), TrainConfig(cudnn_benchmark=on, tf32=on, channels_last=on))
    assert torch.backends.cudnn.benchmark is on and torch.backends.cuda.matmul.allow_tf32 is on
    assert torch.backends.cudnn.allow_tf32 is on
    assert model.weight.is_contiguous(memory_format=torch.channels_last) is on
    assert TrainConfig().cudnn_benchmark and TrainConfig().tf32
