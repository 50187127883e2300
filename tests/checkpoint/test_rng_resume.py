"""Resuming a checkpoint on nodes with another number of GPUs (issue 13, item 6).

Checkpoints used to hold every CUDA device's RNG state of each rank
(`torch.cuda.get_rng_state_all`) and restore them all, so a resume on nodes with
fewer GPUs raised IndexError. Now each rank saves its own device's state, and the
restore picks what belongs to its device from either layout. The CPU tests build such
checkpoints and run the real restore path; the GPU test shows the IndexError is gone.
"""
from __future__ import annotations

import io

import pytest
import torch

from launcher.distributed.rng import cuda_state_for, rng_state, set_rng_state


def old_layout_state(devices: int) -> dict:
    """A rank's "rng" entry as the old code saved it on a node with `devices` GPUs: all of them."""
    state = rng_state(torch.device("cpu"))
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(devices)]
    return state


def through_checkpoint(state: dict) -> dict:
    """Save and load as checkpoints are (weights_only=True)."""
    buf = io.BytesIO()
    torch.save({"ranks": [{"rng": state}]}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["ranks"][0]["rng"]


def test_old_checkpoint_from_a_node_with_more_gpus_restores_this_devices_entry():
    saved = through_checkpoint(old_layout_state(8))
    # Resumed on a node with 2 GPUs: the rank on cuda:1 takes entry 1, never entry 7's neighbours.
    assert torch.equal(cuda_state_for(saved["cuda"], 1), saved["cuda"][1])
    # More GPUs now than then: nothing saved for that device, it keeps its seeded state.
    assert cuda_state_for(saved["cuda"][:2], 5) is None


def test_new_checkpoint_holds_one_state_and_restores_it_on_any_device_index():
    state = rng_state(torch.device("cpu"))
    assert "cuda" not in state  # a CPU rank saves no CUDA state
    state["cuda"] = torch.full((16,), 3, dtype=torch.uint8)  # what a GPU rank saves: its device's state
    saved = through_checkpoint(state)
    assert torch.equal(cuda_state_for(saved["cuda"], 0), saved["cuda"])
    assert torch.equal(cuda_state_for(saved["cuda"], 6), saved["cuda"])
    assert cuda_state_for(None, 0) is None


def test_set_rng_state_on_cpu_ignores_saved_cuda_states_and_restores_the_rest():
    torch.manual_seed(1)
    saved = through_checkpoint(old_layout_state(8))
    expected = torch.rand(3)
    torch.manual_seed(2)
    set_rng_state(saved, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_resume_on_a_node_with_fewer_gpus():
    """A checkpoint written where each rank saw one GPU more than this node has."""
    gpus = torch.cuda.device_count()
    device = torch.device("cuda", gpus - 1)
    torch.cuda.manual_seed_all(7)
    mine = torch.cuda.get_rng_state(device)
    state = rng_state(device)
    assert torch.is_tensor(state["cuda"]) and torch.equal(state["cuda"], mine)
    old = dict(state, cuda=[torch.cuda.get_rng_state(i) for i in range(gpus)] + [mine.clone()])
    with pytest.raises(IndexError):  # what the old restore did with it
        torch.cuda.set_rng_state_all(old["cuda"])
    expected = torch.rand(4, device=device)
    torch.cuda.manual_seed_all(8)
    set_rng_state(through_checkpoint(old), device)  # the launcher's restore: no IndexError
    assert torch.equal(torch.rand(4, device=device), expected)
    torch.cuda.manual_seed_all(9)
    set_rng_state(through_checkpoint(state), device)  # the new layout
    assert torch.equal(torch.rand(4, device=device), expected)
