"""Datasets: what a run trains and evaluates on, loaded onto the device.

``load`` returns a :class:`Dataset`: the training split (drawn from in the keyed order, augmented at
step time), the un-augmented training split for the full-gradient norm, an optional validation split
held out of the training set by a keyed draw, and the test split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import order
from ..order import Augment  # noqa: F401  (re-exported: the augmentation settings of a dataset)
from ..recipe import Data  # noqa: F401  (re-exported for callers that build a data config by hand)
from .builtin import SIZES, check_available  # noqa: F401
from .builtin import sizes as _builtin_sizes
from .memory import InMemoryBatches, TensorSplit


@dataclass
class Dataset:
    train: TensorSplit                 # the training samples (after the validation split is held out)
    test: TensorSplit
    num_classes: Optional[int]
    augment: Optional[Augment]
    validation: Optional[TensorSplit] = None

    @property
    def train_eval(self) -> TensorSplit:
        """The training set without augmentation (in memory, augmentation happens at step time)."""
        return self.train

    @property
    def shape(self):
        return self.train.sample_shape

    def batches(self, sampler, seed: int, comm) -> InMemoryBatches:
        return InMemoryBatches(self.train, sampler, self.augment, seed, comm)


def validation_indices(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): floor(fraction n) samples held out by a keyed draw that
    depends on n only, so every run on the same data holds out the same samples."""
    held = int(fraction * n)
    perm = torch.randperm(n, generator=order.keyed_generator(0, "validation", n))
    return perm[held:].sort().values, perm[:held].sort().values


def sizes(cfg) -> tuple[int, int]:
    """(training samples, test samples) as the run will see them (validation held out)."""
    n, test = _builtin_sizes(cfg)
    return n - int(cfg.validation * n), test


def load(cfg, device: torch.device, dtype: torch.dtype, is_first: bool = True) -> Dataset:
    """Load the whole dataset onto ``device`` (CIFAR is 600 MB as float32: fine on any GPU).

    With ``download``, call it on one process first (``is_first``), then on the others after a barrier.
    """
    from . import builtin
    (xtr, ytr), (xte, yte), classes, augment = builtin.load(cfg, is_first)
    move = lambda x, y: TensorSplit(x.to(device=device, dtype=dtype), y.to(device))  # noqa: E731
    train, validation = move(xtr, ytr), None
    if cfg.validation:
        keep, held = validation_indices(len(ytr), cfg.validation)
        train, validation = move(xtr[keep], ytr[keep]), move(xtr[held], ytr[held])
    return Dataset(train, move(xte, yte), classes, augment, validation)
