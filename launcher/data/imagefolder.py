"""``data.dataset: imagefolder``: root/train/<class>/* and root/val/<class>/*, read by torchvision's
ImageFolder, resized and centre-cropped to ``data.image_size`` and normalised with ImageNet's statistics
(deterministic, in the worker); the random augmentation is the launcher's keyed crop and flip (and
rotation) on top, a pure function of (seed, epoch, index). The full-gradient norm reads the training
images without it."""
from __future__ import annotations

from pathlib import Path

from launcher.errors import UserError
from launcher.data.order import Augment

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _folder(cfg, split: str) -> Path:
    if not cfg.root:
        raise UserError("data.root: None is not valid; allowed: a folder with train/<class>/ and val/<class>/ images")
    path = Path(cfg.root).expanduser() / split
    if not path.is_dir() or not any(p.is_dir() for p in path.iterdir()):
        raise UserError(f"data.root: {cfg.root!r} has no {split}/<class>/ folders; allowed: a folder with "
                        "train/<class>/ and val/<class>/ images (torchvision's ImageFolder layout)")
    return path


def check_available(cfg) -> None:
    for split in ("train", "val"):
        _folder(cfg, split)


def sizes(cfg) -> tuple[int, int]:
    """(train, val) image counts, from the file names alone."""
    def count(path):
        return sum(1 for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS)
    return count(_folder(cfg, "train")), count(_folder(cfg, "val"))


def load(cfg):
    """(train dataset, val dataset, classes, augmentation)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    size = cfg.image_size or 224
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    train = ImageFolder(str(_folder(cfg, "train")), transform=transform)
    val = ImageFolder(str(_folder(cfg, "val")), transform=transform)
    if train.classes != val.classes:
        raise UserError(f"data.root: {cfg.root!r}: train/ and val/ have different classes; allowed: the same "
                        "class folders in both")
    black = tuple(-m / s for m, s in zip(MEAN, STD))
    augment = Augment(pad=max(1, size // 8), flip=True, rotate=float(cfg.rotation), fill=black) if cfg.augment else None
    return train, val, len(train.classes), augment
