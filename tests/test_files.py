"""launcher/files.py: the safetensors writer (every dtype round-trips) and the one checksum check (Corrupt names
what failed). Atomic writes are exercised by every test that kills a process mid-write."""
import io

import pytest
import torch
from safetensors.torch import load

from launcher.files import Corrupt, verify, write_safetensors

DTYPES = [d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                      torch.int16, torch.int8, torch.uint8, torch.bool, getattr(torch, "uint16", None),
                      getattr(torch, "uint32", None), getattr(torch, "uint64", None),
                      getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_safetensors_round_trips_every_dtype_safetensors_knows(dtype):
    t = (torch.arange(12) % 3).reshape(3, 4).to(dtype)
    buf = io.BytesIO()
    digest, size = write_safetensors(buf, {"t": t, "empty": torch.empty(0, dtype=dtype)}, {"step": "1"})
    data = buf.getvalue()
    verify(data, digest, size, "x")
    back = load(data)
    assert back["t"].dtype == dtype and torch.equal(back["t"].view(torch.uint8), t.view(torch.uint8))
    assert back["empty"].shape == (0,)


def test_verify_names_size_and_checksum_failures():
    with pytest.raises(Corrupt, match="size 3 != 4 bytes"):
        verify(b"abc", "0" * 64, 4, "f")
    with pytest.raises(Corrupt, match="sha256 checksum mismatch"):
        verify(b"abc", "0" * 64, 3, "f")
