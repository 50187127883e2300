"""data.DevicePrefetcher: the loader's step batches on the training device, the next copied ahead on a GPU."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from launcher.data import DevicePrefetcher


def _loader(n=10, batch=4, image=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 5, 5, generator=g) if image else torch.randn(n, 7, generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n)), batch_size=batch, pin_memory=torch.cuda.is_available())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
@pytest.mark.parametrize("nhwc", [False, True])
def test_every_batch_in_order_on_the_device_then_exhausted(device, nhwc):
    device = torch.device(device)
    loader = _loader()
    got = list(DevicePrefetcher(loader, device, channels_last=nhwc))
    want = list(loader)
    assert len(got) == len(want) == 3  # 4 + 4 + 2: the last, short batch too
    for (x, y), (wx, wy) in zip(got, want):
        assert x.device.type == y.device.type == device.type
        assert torch.equal(x.cpu(), wx) and torch.equal(y.cpu(), wy)
        assert x.is_contiguous(memory_format=torch.channels_last) is nhwc
    flat = list(DevicePrefetcher(_loader(image=False), device, channels_last=True))  # only 4-d inputs become NHWC
    assert all(x.is_contiguous() for x, _ in flat)
    assert list(DevicePrefetcher([], device)) == []


def test_on_the_cpu_the_batches_pass_through_uncopied():
    loader = _loader()
    for (x, y), (wx, wy) in zip(DevicePrefetcher(list(loader), torch.device("cpu")), list(loader)):
        assert torch.equal(x, wx)
    batches = list(loader)
    (x, _), = list(DevicePrefetcher(batches[:1], torch.device("cpu")))
    assert x is batches[0][0]  # no copy on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_copy_overlaps_compute_and_is_never_overwritten_while_read():
    """Each batch is read by a long kernel queue on the compute stream while the next is copied on the side
    stream; sums taken on the compute stream match the host's (record_stream keeps the memory alive)."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 3, 64, 64, generator=g).pin_memory(), torch.arange(64)) for _ in range(6)]
    w = torch.randn(2048, 2048, device=device)
    sums = []
    for x, _ in DevicePrefetcher(data, device, channels_last=True):
        for _ in range(20):  # keep the compute stream busy while the next copy runs
            w = torch.tanh(w @ w)
        sums.append(x.double().sum())
    torch.cuda.synchronize()
    assert [float(s) for s in sums] == pytest.approx([float(x.double().sum()) for x, _ in data])
