"""Bring your own model, data and loss: a complete example (recipes/examples/own.yaml runs it).

    cd recipes/examples && qhm-launch run own.yaml

The contract, in three factories named by import path in the recipe ("module:callable"; the working
directory and PYTHONPATH are importable, in the launcher and in every worker):

* ``model.factory(**kwargs)`` returns a torch.nn.Module. It is built with the RNG seeded by the recipe's
  seed, so every rank starts from the same weights.
* ``data.factory(**kwargs)`` returns an object (or dict) with ``train`` and ``test``: map-style datasets
  whose item i is (input tensor, target); optionally ``train_eval`` (the training set without random
  transforms: the full-gradient norm uses it) and ``num_classes``. Random transforms inside a dataset
  are fine: each sample is read with the RNGs seeded from (seed, epoch, index). With ``data.workers``
  above 0 the datasets are pickled to the worker processes: build them from classes and functions
  defined at a module's top level (no lambdas or local functions; open files lazily in __getitem__).
* ``loss.factory(**kwargs)`` returns fn(output, target) -> one loss per sample (shape [batch]); the
  launcher sums it and divides by the global batch, so accumulation and uneven batches stay exact.
  Without it: cross-entropy. Accuracy is reported when outputs are class logits and targets class
  indices, and left out otherwise.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Spirals(Dataset):
    """Points on ``classes`` interleaved spiral arms, with Gaussian jitter drawn per read when
    ``jitter`` > 0: a random transform, keyed by the launcher through the seeded RNG."""

    def __init__(self, n: int, classes: int, seed: int, jitter: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % classes
        r = torch.rand(n, generator=g) * 3 + 0.3
        angle = r * 2.2 + self.y * (2 * math.pi / classes) + 0.15 * torch.randn(n, generator=g)
        self.x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1)
        self.jitter = jitter

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.jitter:
            x = x + self.jitter * torch.randn(2)          # the global RNG: seeded per (seed, epoch, index)
        return x, self.y[i]


def build_data(n: int = 600, classes: int = 3):
    return {"train": Spirals(n, classes, seed=0, jitter=0.05), "train_eval": Spirals(n, classes, seed=0),
            "test": Spirals(n // 4, classes, seed=1), "num_classes": classes}


class MLP(nn.Module):
    def __init__(self, classes: int = 3, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, classes))

    def forward(self, x):
        return self.net(x)


def build_model(classes: int = 3, width: int = 64):
    return MLP(classes, width)


def smoothed_cross_entropy(smoothing: float = 0.1):
    def per_sample(output, target):
        return F.cross_entropy(output, target, reduction="none", label_smoothing=smoothing)
    return per_sample
