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


class _Streams:
    """Stands in for torch.cuda (Stream, Event, stream, current_stream) and records, in order, where each
    batch's copy was issued and what the compute stream waited for, so the ordering runs on the CPU."""

    def __init__(self):
        self.calls, self.current = [], "compute"
        rec = self

        class Stream:
            def __init__(self, device=None, name="side"):
                self.name = name

            def wait_event(self, event):
                rec.calls.append((self.name, "wait", event.batch))

        class Event:
            def record(self, stream):
                self.batch = rec.copied[-1]
                rec.calls.append((stream.name, "record", self.batch))

        self.Stream, self.Event, self.compute, self.copied = Stream, Event, Stream(name="compute"), []

    def stream(self, s):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            before, self.current = self.current, s.name
            yield
            self.current = before
        return ctx()

    def current_stream(self, device=None):
        return self.compute


class _Copied(torch.Tensor):
    """A CPU tensor whose copy to the device says on which stream it was issued."""
    rec: "_Streams | None" = None

    def to(self, *args, **kwargs):
        batch = int(self.as_subclass(torch.Tensor).flatten()[0])
        _Copied.rec.copied.append(batch)
        _Copied.rec.calls.append((_Copied.rec.current, "copy", batch))
        return self.as_subclass(torch.Tensor).to(*args, **kwargs).as_subclass(_Kept)


class _Kept(torch.Tensor):
    def record_stream(self, stream):
        _Copied.rec.calls.append((stream.name, "keep", int(self.as_subclass(torch.Tensor).flatten()[0])))


def test_each_next_batch_is_copied_on_the_side_stream_while_the_current_one_computes():
    """The ordering a GPU gets, recorded on the CPU: every copy is issued on the side stream (never the
    compute stream), batch k+1's before batch k is handed to the step (so the copy overlaps its compute),
    and the compute stream waits for a batch's own event and keeps its memory (record_stream) before
    reading it. A prefetcher copying on the compute stream, or only when asked, fails this."""
    rec = _Copied.rec = _Streams()
    batches = [(torch.full((2, 3), float(k)).as_subclass(_Copied), torch.full((2,), k).as_subclass(_Copied))
               for k in range(4)]
    seen = []
    for x, _ in DevicePrefetcher(batches, torch.device("cpu"), cuda=rec):
        k = int(x.as_subclass(torch.Tensor)[0, 0])
        rec.calls.append(("compute", "step", k))
        seen.append(k)
    assert seen == [0, 1, 2, 3]
    assert [c for c in rec.calls if c[1] == "copy"] == [("side", "copy", k) for k in range(4) for _ in (0, 1)]
    for k in range(4):
        step = rec.calls.index(("compute", "step", k))
        assert rec.calls.index(("side", "record", k)) < rec.calls.index(("compute", "wait", k)) < step
        assert rec.calls.count(("compute", "keep", k)) == 2 and rec.calls.index(("compute", "keep", k)) < step
        if k < 3:  # the next batch's copy is on its way before this one computes
            assert rec.calls.index(("side", "copy", k + 1)) < step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_batch_is_never_overwritten_while_the_compute_stream_reads_it():
    """On a GPU: each batch is read by a long kernel queue on the compute stream while the next is copied on
    the side stream; sums taken on the compute stream match the host's (record_stream keeps the memory
    alive). That the copy is on the side stream, ahead: the recorded test above."""
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
