"""Random images and labels for throughput work: no downloads, any size.

`model=resnet` is a bottleneck ResNet (the defaults give ResNet-50's 25.6M
parameters); `model=vit` a ViT (the defaults give ViT-B/16's 86.6M). Both are
plain torch so benchmarks need neither timm nor torchvision.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn
from torch.utils.data import Dataset

from launcher.jobs.base import Choice, Job, JobConfig


class SyntheticModel(Choice):
    """job.model for synthetic: a ResNet or a ViT."""
    resnet = "resnet"
    vit = "vit"


@dataclass
class SyntheticJob(JobConfig):
    """Random images and labels at a chosen size: the model and the step cost without any data on disk."""
    name: str = "synthetic"
    target: str = "launcher.jobs.synthetic:Synthetic"
    batch_size: int = 32
    model: SyntheticModel = SyntheticModel.resnet  # resnet: ResNet-50-shaped; vit: ViT-B/16-shaped
    width: int = 64  # resnet: stem channels (64 = ResNet-50 widths); vit: ignored
    depth: List[int] = field(default_factory=lambda: [3, 4, 6, 3])  # resnet stages
    dim: int = 768  # vit
    layers: int = 12  # vit
    heads: int = 12  # vit
    patch: int = 16  # vit
    image_size: int = 224  # input resolution
    num_classes: int = 1000  # number of classes
    train_samples: int = 4096  # synthetic training samples
    val_samples: int = 1024  # synthetic validation samples


class RandomImages(Dataset):
    """Deterministic per index, generated on the fly: no memory for large sets."""

    def __init__(self, n: int, size: int, classes: int, seed: int):
        self.n, self.size, self.classes, self.seed = n, size, classes, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(3, self.size, self.size, generator=g), int(torch.randint(self.classes, (1,), generator=g))


class Bottleneck(nn.Module):
    """A ResNet bottleneck block (1x1, 3x3, 1x1, with a projected shortcut where the shape changes)."""
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    """A ResNet of bottleneck blocks (`depth` per stage), ResNet-50-like at the defaults."""
    def __init__(self, width: int = 64, depth=(3, 4, 6, 3), classes: int = 1000):
        super().__init__()
        layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                  nn.MaxPool2d(3, 2, 1)]
        cin = width
        for i, n in enumerate(depth):
            w = width * 2 ** i
            for j in range(n):
                layers.append(Bottleneck(cin, w, 2 if j == 0 and i > 0 else 1))
                cin = w * 4
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class ViT(nn.Module):
    """A small vision transformer: patch embedding, `layers` encoder blocks, a class token head."""
    def __init__(self, image_size=224, patch=16, dim=768, layers=12, heads=12, classes=1000):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class Synthetic(Job):
    """The synthetic job: seeded random images, the ResNet or the ViT (cross-entropy, accuracy)."""
    def model(self) -> nn.Module:
        c = self.cfg
        if c.model == "resnet":
            return ResNet(c.width, tuple(c.depth), c.num_classes)
        if c.model == "vit":
            return ViT(c.image_size, c.patch, c.dim, c.layers, c.heads, c.num_classes)
        raise ValueError(f"job.model={c.model!r} is not valid; choose resnet or vit")

    def datasets(self):
        c = self.cfg
        return (RandomImages(c.train_samples, c.image_size, c.num_classes, seed=1),
                RandomImages(c.val_samples, c.image_size, c.num_classes, seed=2))
