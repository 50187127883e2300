"""MNIST-1D (Greydanus, 2020): a tiny 1-D digit task where MLPs and CNNs differ.

The data set is generated offline by the `mnist1d` package (~2 s) and cached
under ~/.cache/launcher so that every rank and every test reuses it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from launcher.jobs.base import Choice, Job, JobConfig


class Mnist1dModel(Choice):
    """job.model for mnist1d: the paper's MLP or its CNN."""
    mlp = "mlp"
    cnn = "cnn"  # the two models of the MNIST-1D paper


@dataclass
class Mnist1dJob(JobConfig):
    """MNIST-1D (Greydanus 2020): 1-d signals of ten digits, generated locally; small enough to train on a CPU."""
    name: str = "mnist1d"
    target: str = "launcher.jobs.mnist1d:Mnist1D"
    batch_size: int = 64
    model: Mnist1dModel = Mnist1dModel.cnn  # the paper's two models: its MLP or its ConvBase CNN
    hidden: int = 100  # mlp hidden width
    channels: int = 25  # cnn channels
    samples: int = 5000  # train + test, 80/20 split as in the paper
    data_seed: int = 42  # seed of the generated data set


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "launcher"


def make_data(samples: int, seed: int) -> dict:
    key = hashlib.sha1(f"mnist1d-{samples}-{seed}".encode()).hexdigest()[:12]
    path = _cache_dir() / f"mnist1d-{key}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except Exception:
            pass  # a torn cache file: regenerate
    from mnist1d.data import get_dataset_args, make_dataset  # imports matplotlib: only when generating

    args = get_dataset_args()
    args.num_samples, args.seed = samples, seed
    data = make_dataset(args)
    out = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


class MLP(nn.Module):
    """The paper's MLP: two hidden layers of `hidden` units."""
    def __init__(self, length: int = 40, hidden: int = 100, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(length, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """The paper's ConvBase: three stride-2 convolutions, then a linear head."""

    def __init__(self, length: int = 40, channels: int = 25, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten())
        with torch.no_grad():
            flat = self.net(torch.zeros(1, 1, length)).shape[1]
        self.head = nn.Linear(flat, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x.unsqueeze(1)))


class Mnist1D(Job):
    """The MNIST-1D job: the generated data set (cached on disk), the paper's models (cross-entropy, accuracy)."""
    def model(self) -> nn.Module:
        if self.cfg.model == "mlp":
            return MLP(hidden=self.cfg.hidden)
        return CNN(channels=self.cfg.channels)

    def datasets(self):
        d = make_data(self.cfg.samples, self.cfg.data_seed)
        t = lambda x, y: TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))
        return t(d["x"], d["y"]), t(d["x_test"], d["y_test"])
