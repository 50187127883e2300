"""EMA numerics against straightforward references, integer buffers, skips, rank-0-only."""
import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import FAST, launch, read_jsonl
from launcher.ema import EMA


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def train_steps(model, n):
    """Real SGD steps: parameters and BatchNorm statistics both move."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 3, 8, 8, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield


def test_matches_yolov5_formula_over_300_updates():
    model = net()
    ema = EMA(model, decay=0.999, ramp="exp", tau=50)
    ref = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    for n, _ in enumerate(train_steps(model, 300), start=1):
        ema.update(model)
        d = 0.999 * (1 - math.exp(-n / 50))  # YOLOv5 ModelEMA, written out per tensor
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                ref[k] *= d
                ref[k] += (1 - d) * v.detach()
            else:
                ref[k] = v.clone()
    for k in ref:
        torch.testing.assert_close(ema.shadow[k], ref[k], atol=1e-6, rtol=0)
    assert ema.updates == 300


def test_matches_torch_averaged_model():
    model = net()
    ema = EMA(model, decay=0.99, ramp="none")
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
    avg.update_parameters(model)  # its first update copies; ours starts from the same weights
    for _ in train_steps(model, 200):
        ema.update(model)
        avg.update_parameters(model)
    theirs = avg.module.state_dict()
    for k, v in ema.shadow.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, theirs[k], atol=1e-6, rtol=0)


def test_integer_buffers_copied_not_averaged():
    model = net()
    ema = EMA(model, decay=0.9, ramp="none")
    for _ in train_steps(model, 7):
        ema.update(model)
    key = "1.num_batches_tracked"
    assert ema.shadow[key].dtype == torch.long and int(ema.shadow[key]) == 7 == int(model.state_dict()[key])


def test_skipped_step_leaves_ema_untouched_and_ramp_paused():
    model = net()
    ema = EMA(model, decay=0.9, ramp="tf")
    steps = train_steps(model, 3)
    next(steps)
    ema.update(model)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    next(steps)
    ema.update(model, skip=True)
    assert all(torch.equal(before[k], ema.shadow[k]) for k in before)
    assert (ema.updates, ema.skipped) == (1, 1)


def test_fp32_shadow_for_low_precision_weights():
    model = net().to(torch.bfloat16)
    ema = EMA(model, decay=0.5, ramp="none")
    assert all(v.dtype == torch.float32 for k, v in ema.shadow.items() if "num_batches" not in k)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    ema.update(model)
    w = model.state_dict()["0.weight"].float()
    torch.testing.assert_close(ema.shadow["0.weight"], (w - 1) * 0.5 + w * 0.5, atol=1e-2, rtol=0)


@pytest.mark.parametrize("ramp,n,expected", [("exp", 2000, 0.9999 * (1 - math.exp(-1))), ("tf", 10, 0.55),
                                             ("tf", 10**6, 0.9999), ("none", 1, 0.9999)])
def test_ramps(ramp, n, expected):
    assert EMA(net(), decay=0.9999, ramp=ramp, tau=2000).decay_at(n) == pytest.approx(expected)


def test_state_dict_round_trip():
    model = net()
    a = EMA(model, decay=0.99)
    for _ in train_steps(model, 5):
        a.update(model)
    b = EMA(net(), decay=0.99)
    b.load_state_dict(a.state_dict())
    assert b.updates == 5 and all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
    copy = net()
    b.copy_to(copy)
    assert torch.equal(copy.state_dict()["4.weight"], a.shadow["4.weight"])


def test_once_per_optimizer_step_with_accumulation_and_every(tmp_path):
    launch(["train", *FAST, "train.epochs=0", "train.max_steps=10", "batch.size=16", "batch.global_size=64",
            "ema.every=2", "validation.mode=off", f"run.dir={tmp_path}/r"])
    end = [e for e in read_jsonl(tmp_path / "r" / "events.jsonl") if e["event"] == "end"][0]
    assert end["accum"] == 4 and end["ema_updates"] == 5


@pytest.mark.slow
def test_only_rank_zero_holds_the_ema(tmp_path):
    launch(["train", *FAST, "train.epochs=1", "validation.mode=inline", f"run.dir={tmp_path}/r"], nproc=2)
    logs = tmp_path / "r" / "logs"
    assert "EMA kept on this rank" in (logs / "rank-0.log").read_text()
    assert "EMA: none on this rank" in (logs / "rank-1.log").read_text()
    from safetensors.torch import load_file
    ema = load_file(tmp_path / "r" / "ema.safetensors")
    best = load_file(tmp_path / "r" / "best" / "model.safetensors")
    assert ema.keys() == best.keys() and "net.0.weight" in ema


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_update_is_a_few_flat_ops_and_a_skip_is_bitwise_exact(dtype):
    """Issue 14 item 2: each dtype group's average is one flat buffer (shadow entries are views
    into it, with the model's own strides, channels_last included), the gated update keeps the
    host path's numbers, and a skipped step leaves every bit in place: -0.0 stays -0.0 (lerp(v, v)
    would turn it into +0.0), inf stays inf, and NaN weights never enter."""
    model = net().to(dtype).to(memory_format=torch.channels_last)
    host_model = net().to(dtype).to(memory_format=torch.channels_last)
    host, gated = EMA(host_model, 0.9, "exp", 3.0), EMA(model, 0.9, "exp", 3.0)
    floats = [v for v in gated.shadow.values() if v.is_floating_point()]
    assert len({v.untyped_storage().data_ptr() for v in floats}) == 1  # one flat fp32 buffer
    assert gated.shadow["0.weight"].is_contiguous(memory_format=torch.channels_last)
    for step in range(3):
        for m in (model, host_model):
            torch.manual_seed(step)
            with torch.no_grad():
                m(torch.randn(4, 3, 8, 8, dtype=dtype))  # BatchNorm statistics and num_batches_tracked move
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
        host.update(host_model)
        gated._update_gated(model, torch.tensor(False))  # the GPU's device-side gate, run on the CPU
    assert all(torch.equal(_bits(host.shadow[k]), _bits(gated.shadow[k])) for k in host.shadow)

    gated.shadow["0.bias"][0], gated.shadow["1.running_mean"][0] = -0.0, float("inf")
    before = {k: v.clone() for k, v in gated.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    gated._update_gated(model, torch.tensor(True))
    for k, v in before.items():
        assert torch.equal(_bits(gated.shadow[k]), _bits(v)), k
    assert (gated.updates, gated.skipped) == (3, 1)
    state = gated.state_dict()
    assert state["shadow"].keys() == model.state_dict().keys() and state["updates"] == 3


def test_state_dict_of_flat_views_saves_and_loads():
    """Views of the flat buffers go through torch.save (weights_only load) and safetensors unchanged."""
    import io

    from safetensors.torch import load, save
    model = net()
    ema = EMA(model, decay=0.9)
    for _ in train_steps(model, 2):
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    other = EMA(net(), decay=0.9)
    other.load_state_dict(torch.load(buf, weights_only=True))
    again = load(save({k: v.contiguous() for k, v in other.shadow.items()}))
    assert all(torch.equal(again[k], ema.shadow[k]) for k in ema.shadow) and other.updates == 2


def _small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_ema_device_gate_is_the_host_path_without_a_sync():
    """A 0-d tensor `skip` (what train.py passes on a GPU) averages exactly like the host
    bool when the step is finite, leaves the average bit-exact when it is not (even with
    NaN weights), and settles the counters when they are read."""
    model, host_model = _small(0), _small(0)
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
