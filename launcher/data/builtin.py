"""The built-in datasets, loaded whole as tensors: scikit-learn's digits (ships with it), a synthetic
problem, and CIFAR-10/100 from a local torchvision root (or downloaded where the network allows)."""
from __future__ import annotations

from pathlib import Path

import torch

from launcher.errors import UserError
from launcher.data.order import Augment

SIZES = {"digits": (1500, 297), "cifar10": (50000, 10000), "cifar100": (50000, 10000)}
SYNTHETIC_DEFAULT = 600
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def sizes(cfg) -> tuple[int, int]:
    """(train, test) sizes, known without loading any data."""
    if cfg.dataset == "synthetic":
        n = cfg.size or SYNTHETIC_DEFAULT
        return n, max(1, n // 4)
    return SIZES[cfg.dataset]


def check_available(cfg) -> None:
    """Fail before any worker starts if a CIFAR root is missing (and no download was asked for)."""
    if cfg.dataset not in CIFAR_FOLDERS or cfg.download:
        return
    if cfg.root is None:
        raise UserError(f"data.root: None is not valid; allowed: the folder holding "
                        f"{CIFAR_FOLDERS[cfg.dataset]}/ (or set data.download: true)")
    folder = Path(cfg.root).expanduser() / CIFAR_FOLDERS[cfg.dataset]
    if not folder.is_dir():
        raise UserError(f"data.root: {cfg.root!r} has no {CIFAR_FOLDERS[cfg.dataset]}/ folder; allowed: "
                        "the folder torchvision downloads CIFAR into (or set data.download: true)")


def _normalise(train: torch.Tensor, test: torch.Tensor, mean=None, std=None):
    """Normalised images, and the value a black (0) pixel takes after normalisation, per channel."""
    if mean is None:
        dims = (0, 2, 3)
        mean, std = train.mean(dims, keepdim=True), train.std(dims, keepdim=True)
    else:
        mean = torch.tensor(mean).view(1, -1, 1, 1)
        std = torch.tensor(std).view(1, -1, 1, 1)
    black = tuple(float(v) for v in (-mean / std).flatten())
    return (train - mean) / std, (test - mean) / std, black


def digits():
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))   # fixed split
    n = SIZES["digits"][0]
    tr, te = order[:n], order[n:]
    xtr, xte, black = _normalise(x[tr], x[te])
    return (xtr, y[tr]), (xte, y[te]), 10, dict(pad=1, flip=False, fill=black)


def synthetic(n: int, shape=(1, 8, 8), classes: int = 10):
    """A learnable problem: class prototypes plus noise (default 10 classes of 1x8x8); fixed whatever
    the seed. With ``shape`` [3, 32, 32] and 100 classes it stands in for CIFAR-100 in benchmarks."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(classes, *shape, generator=g)
    total = n + max(1, n // 4)
    y = torch.randint(0, classes, (total,), generator=g)
    x = protos[y] + 0.8 * torch.randn(total, *shape, generator=g)
    pad = max(1, shape[-1] // 8)
    return (x[:n], y[:n]), (x[n:], y[n:]), classes, dict(pad=pad, flip=shape[-1] > 8, fill=(0.0,) * shape[0])


def cifar(cfg, is_first: bool):
    import torchvision
    cls = torchvision.datasets.CIFAR100 if cfg.dataset == "cifar100" else torchvision.datasets.CIFAR10
    root = str(Path(cfg.root or "data").expanduser())
    try:
        train = cls(root, train=True, download=cfg.download and is_first)
        test = cls(root, train=False, download=cfg.download and is_first)
    except RuntimeError as exc:
        raise UserError(f"data.root: {root!r}: {exc}") from None
    to_tensor = lambda d: torch.tensor(d.data).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    xtr, xte, black = _normalise(to_tensor(train), to_tensor(test), *CIFAR_STATS[cfg.dataset])
    return ((xtr, torch.tensor(train.targets)), (xte, torch.tensor(test.targets)), len(train.classes),
            dict(pad=4, flip=True, fill=black))


def load(cfg, is_first: bool):
    """((train x, y), (test x, y), classes, augmentation settings) on the CPU."""
    if cfg.dataset == "digits":
        out = digits()
    elif cfg.dataset == "synthetic":
        out = synthetic(cfg.size or SYNTHETIC_DEFAULT, tuple(cfg.shape or (1, 8, 8)), cfg.classes or 10)
    else:
        out = cifar(cfg, is_first)
    train, test, classes, aug = out
    augment = Augment(rotate=float(cfg.rotation), **aug) if cfg.augment else None
    return train, test, classes, augment
