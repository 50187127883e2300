"""Your own images: the torchvision ImageFolder layout and any timm model by name.

    <job.data_dir>/train/<class>/*.jpg      (any format PIL reads)
    <job.data_dir>/val/<class>/*.jpg        (the same class folders)

`job.model` is a `timm.create_model` name (resnet50, convnext_tiny, vit_small_patch16_224, ...);
without timm, a `torchvision.models` name. Weights start random: nothing is downloaded at run
time; `job.pretrained=<file>` loads a local .safetensors/.pth (a classifier of another shape is
left out). Needs the `vision` extra: pip install -e ".[vision]".
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from launcher.jobs.base import Job, JobConfig

log = logging.getLogger("launcher.jobs.images")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm and torchvision use
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImagesJob(JobConfig):
    """An image classification job: an ImageFolder tree of your own and a timm (else torchvision) model."""
    name: str = "images"
    target: str = "launcher.jobs.images:Images"
    batch_size: int = 32
    data_dir: Optional[str] = None  # holds train/<class>/ and val/<class>/
    model: str = "resnet18"  # a timm.create_model name; a torchvision.models name without timm
    pretrained: Optional[str] = None  # a local weights file (.safetensors or .pth); None = random init
    image_size: int = 224  # train: RandomResizedCrop(size) + flip; val: Resize(size/0.875) + CenterCrop(size)
    num_classes: int = 0  # 0 = the number of class folders under train/


_TV_OPS = None  # keeps the op schemas below alive


def vision():
    """(torchvision, timm or None). PyPI's torchvision wheel is built against CUDA torch: with the
    CPU-only torch its C++ detection ops (nms, roi_align) cannot load, and `import torchvision`
    then fails registering fake kernels for two of them. Declaring those two schemas lets it
    import; classification uses none of those ops."""
    global _TV_OPS
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        _TV_OPS = torch.library.Library("torchvision", "FRAGMENT")
        _TV_OPS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TV_OPS.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision
    try:
        import timm
    except ImportError:
        timm = None
    return torchvision, timm


def classes(folder: Path) -> list:
    return sorted(d.name for d in os.scandir(folder) if d.is_dir()) if folder.is_dir() else []


class Images(Job):
    """The images job: the model by name, the folder's train/ and val/ sets (cross-entropy, accuracy)."""
    @classmethod
    def check(cls, cfg) -> None:
        """Bad input before anything starts: raises ValueError with what is wrong and what to do."""
        try:
            tv, timm = vision()
        except ImportError:
            raise ValueError("job=images needs torchvision and timm: pip install -e '.[vision]' "
                             "(torchvision matching your torch)") from None
        if not cfg.data_dir:
            raise ValueError("job=images needs job.data_dir=<dir> holding train/<class>/*.jpg and val/<class>/*.jpg")
        root = Path(cfg.data_dir)
        train, val = classes(root / "train"), classes(root / "val")
        if not train or not val:
            raise ValueError(f"job.data_dir={cfg.data_dir!r} has no class folders under "
                             f"{'train/' if not train else 'val/'}; expected train/<class>/*.jpg and val/<class>/*.jpg")
        if val != train:
            raise ValueError(f"job.data_dir={cfg.data_dir!r}: val/ has classes {val[:5]}... but train/ has "
                             f"{train[:5]}...; give both the same class folders")
        if cfg.num_classes and cfg.num_classes < len(train):
            raise ValueError(f"job.num_classes={cfg.num_classes} < {len(train)} class folders; use 0 (auto)")
        if cfg.pretrained and not Path(cfg.pretrained).is_file():
            raise ValueError(f"job.pretrained={cfg.pretrained!r} is not a file; give a local .safetensors/.pth "
                             "or leave it unset (random init); nothing is downloaded")
        known = timm.is_model(cfg.model) if timm else cfg.model in tv.models.list_models()
        if not known:
            lib = "timm.list_models()" if timm else "torchvision.models.list_models()"
            raise ValueError(f"job.model={cfg.model!r} is not a model name; see {lib}")

    def model(self) -> nn.Module:
        tv, timm = vision()
        c = self.cfg
        n = c.num_classes or len(classes(Path(c.data_dir) / "train"))
        model = timm.create_model(c.model, pretrained=False, num_classes=n) if timm else \
            tv.models.get_model(c.model, weights=None, num_classes=n)
        if c.pretrained:
            load_pretrained(model, c.pretrained)
        return model

    def datasets(self):
        tv, _ = vision()
        T, size = tv.transforms, self.cfg.image_size
        normalize = [T.ToTensor(), T.Normalize(MEAN, STD)]
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize])
        val_tf = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), *normalize])
        root = Path(self.cfg.data_dir)
        return (tv.datasets.ImageFolder(str(root / "train"), train_tf),
                tv.datasets.ImageFolder(str(root / "val"), val_tf))


def load_pretrained(model: nn.Module, path: str) -> None:
    """Weights from a local file; tensors whose shape differs (another classifier) are left out."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    log.info("pretrained %s: %d of %d tensors loaded (%d left at random init)", path, len(keep), len(own),
             len(own) - len(keep))
