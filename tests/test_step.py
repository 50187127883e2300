"""launcher/step.py: the EMA's skip flag from the GradScaler, read on the device."""
from __future__ import annotations

import pytest
import torch
from torch import nn


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


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
