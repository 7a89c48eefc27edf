"""Datasets, data order and augmentation.

Everything random about the data is a pure function of a key: the order of epoch m is a permutation
drawn from (seed, "order", m); the crop and flip of the i-th sample of global batch (m, k) come from
(seed, "augment", m, k). So the sequence of global batches, augmentation included, is identical
whatever the world size and the micro-batch / accumulation split, and resuming at (m, k) needs no
saved sampler or RNG state beyond the position itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .recipe import Data, RecipeError

SIZES = {"digits": (1500, 297), "cifar10": (50000, 10000), "cifar100": (50000, 10000)}
SYNTHETIC_DEFAULT = 600
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def keyed_generator(seed: int, *key, device="cpu") -> torch.Generator:
    """A torch.Generator seeded from (seed, key...), stable across processes and runs."""
    # str hashes are salted per process, so purposes map to fixed numbers
    words = [seed] + [_PURPOSES[k] if isinstance(k, str) else int(k) for k in key]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


_PURPOSES = {"order": 1, "augment": 2, "gradnorm": 3, "rank_rng": 4}


def sizes(cfg: Data) -> tuple[int, int]:
    """(train, test) sizes, known without loading any data."""
    if cfg.dataset == "synthetic":
        n = cfg.size or SYNTHETIC_DEFAULT
        return n, max(1, n // 4)
    return SIZES[cfg.dataset]


def check_available(cfg: Data) -> None:
    """Fail before any worker starts if a CIFAR root is missing (and no download was asked for)."""
    if cfg.dataset not in CIFAR_FOLDERS or cfg.download:
        return
    if cfg.root is None:
        raise RecipeError(f"data.root: None is not valid; allowed: the folder holding "
                          f"{CIFAR_FOLDERS[cfg.dataset]}/ (or set data.download: true)")
    folder = Path(cfg.root).expanduser() / CIFAR_FOLDERS[cfg.dataset]
    if not folder.is_dir():
        raise RecipeError(f"data.root: {cfg.root!r} has no {CIFAR_FOLDERS[cfg.dataset]}/ folder; allowed: "
                          "the folder torchvision downloads CIFAR into (or set data.download: true)")


@dataclass
class Split:
    images: torch.Tensor       # (N, C, H, W), normalised
    labels: torch.Tensor       # (N,) int64

    def __len__(self):
        return len(self.labels)


@dataclass
class Augment:
    pad: int                   # random crop to the original size after zero padding
    flip: bool                 # random horizontal flip


@dataclass
class Dataset:
    train: Split
    test: Split
    num_classes: int
    augment: Augment | None

    @property
    def shape(self):
        return tuple(self.train.images.shape[1:])


def _normalise(train: torch.Tensor, test: torch.Tensor, mean=None, std=None):
    if mean is None:
        dims = (0, 2, 3)
        mean, std = train.mean(dims, keepdim=True), train.std(dims, keepdim=True)
    else:
        mean = torch.tensor(mean).view(1, -1, 1, 1)
        std = torch.tensor(std).view(1, -1, 1, 1)
    return (train - mean) / std, (test - mean) / std


def _digits():
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))   # fixed split
    n = SIZES["digits"][0]
    tr, te = order[:n], order[n:]
    xtr, xte = _normalise(x[tr], x[te])
    return Split(xtr, y[tr]), Split(xte, y[te]), 10, Augment(pad=1, flip=False)


def _synthetic(n: int):
    """A learnable 10-class problem: class prototypes plus noise, 1x8x8; fixed whatever the seed."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(10, 1, 8, 8, generator=g)
    total = n + max(1, n // 4)
    y = torch.randint(0, 10, (total,), generator=g)
    x = protos[y] + 0.8 * torch.randn(total, 1, 8, 8, generator=g)
    return Split(x[:n], y[:n]), Split(x[n:], y[n:]), 10, Augment(pad=1, flip=False)


def _cifar(cfg: Data, is_first: bool):
    import torchvision
    cls = torchvision.datasets.CIFAR100 if cfg.dataset == "cifar100" else torchvision.datasets.CIFAR10
    root = str(Path(cfg.root or "data").expanduser())
    try:
        train = cls(root, train=True, download=cfg.download and is_first)
        test = cls(root, train=False, download=cfg.download and is_first)
    except RuntimeError as exc:
        raise RecipeError(f"data.root: {root!r}: {exc}") from None
    to_tensor = lambda d: torch.tensor(d.data).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    xtr, xte = _normalise(to_tensor(train), to_tensor(test), *CIFAR_STATS[cfg.dataset])
    return (Split(xtr, torch.tensor(train.targets)), Split(xte, torch.tensor(test.targets)),
            len(train.classes), Augment(pad=4, flip=True))


def load(cfg: Data, device: torch.device, dtype: torch.dtype, is_first: bool = True) -> Dataset:
    """Load the whole dataset onto ``device`` (CIFAR is 600 MB as float32: fine on any GPU).

    With ``download``, call it on one process first (``is_first``), then on the others after a barrier.
    """
    if cfg.dataset == "digits":
        train, test, classes, aug = _digits()
    elif cfg.dataset == "synthetic":
        train, test, classes, aug = _synthetic(cfg.size or SYNTHETIC_DEFAULT)
    else:
        train, test, classes, aug = _cifar(cfg, is_first)
    move = lambda s: Split(s.images.to(device=device, dtype=dtype), s.labels.to(device))  # noqa: E731
    return Dataset(move(train), move(test), classes, aug if cfg.augment else None)


# ------------------------------------------------------------------------------------------------
# Order

class GlobalBatchSampler:
    """Global batch k of epoch m at batch size b: positions [k b, (k+1) b) of epoch m's permutation.

    The last batch of an epoch may be partial (T_m = ceil(n/b)). Stateless: the training position
    (epoch, step) lives in the train state, so there is nothing else to save.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = None, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            self._perm = torch.randperm(self.n, generator=keyed_generator(self.seed, "order", epoch))
            self._epoch = epoch
        return self._perm

    def global_batch(self, epoch: int, step: int, batch: int) -> torch.Tensor:
        return self.permutation(epoch)[step * batch:(step + 1) * batch]


def rank_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of a global batch of ``size`` samples.

    A full batch gives every rank batch/world samples; a partial last batch is spread as evenly as
    contiguous slices allow (some ranks may get none: they still join the gradient reduce).
    """
    per = -(-size // world)
    lo = min(rank * per, size)
    return lo, min(lo + per, size)


def micro_batches(lo: int, hi: int, micro: int) -> list[tuple[int, int]]:
    """[lo, hi) cut into micro-batches of ``micro``; one empty one when the slice is empty."""
    return [(a, min(a + micro, hi)) for a in range(lo, hi, micro)] or [(lo, lo)]


def augment_params(seed: int, epoch: int, step: int, size: int, aug: Augment):
    """Crop offsets and flips for every sample of global batch (epoch, step)."""
    g = keyed_generator(seed, "augment", epoch, step)
    offsets = torch.randint(0, 2 * aug.pad + 1, (2, size), generator=g)
    flips = torch.rand(size, generator=g) < 0.5 if aug.flip else torch.zeros(size, dtype=torch.bool)
    return offsets, flips


def apply_augment(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random crop (zero padding, as torchvision's RandomCrop) and horizontal flip.

    Written here rather than through torchvision transforms because their parameters come from the
    global RNG, one draw per call; ours come from the keyed generator, for the whole batch at once.
    """
    if len(x) == 0:
        return x
    B, C, H, W = x.shape
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (offsets[0][:, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(W, device=x.device))[:, None, None, :]
    out = padded[torch.arange(B, device=x.device)[:, None, None, None],
                 torch.arange(C, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(flips[:, None, None, None], out.flip(-1), out)
