"""Datasets: what a run trains and evaluates on.

``load`` returns a :class:`Dataset`: the training split (drawn from in the keyed order, augmented at
step time), the training split without augmentation (for the full-gradient norm), an optional
validation split held out of the training set by a keyed draw, and the test split. Two paths share the
order module and the loop:

* in memory (the built-in datasets): the whole set as tensors on the device, the fast path on a GPU;
* streamed (imagefolder, token files, a ``data.factory``, or any built-in set with ``data.stream: true``):
  map-style Datasets read through DataLoader workers (see streamed.py); token files are memory-mapped
  windows of tokens (tokens.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from launcher.data import order
from launcher.errors import UserError
from launcher.data.order import Augment
from launcher.config import Data  # noqa: F401  (re-exported for callers that build a data config by hand)
from launcher.data import builtin, imagefolder, tokens
from launcher.data.builtin import SIZES  # noqa: F401
from launcher.data.memory import InMemoryBatches, TensorSplit
from launcher.data.streamed import StreamedBatches, StreamedSplit


@dataclass
class Dataset:
    train: Any                         # TensorSplit (in memory) or StreamedSplit
    test: Any
    num_classes: Optional[int]
    augment: Optional[Augment]
    validation: Any = None
    eval_train: Any = None             # the training set without augmentation, when it differs (a factory's)
    user: bool = False                 # a data factory's datasets: their transforms may draw from the RNGs
    tokens_per_sample: Optional[int] = None   # token windows: every target a token (dense, none masked)

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, StreamedSplit)

    @property
    def train_eval(self):
        """The training set without augmentation (for the in-memory and imagefolder paths the launcher
        augments at step time, so it is the training split itself)."""
        return self.eval_train if self.eval_train is not None else self.train

    @property
    def shape(self):
        return self.train.sample_shape

    def named_splits(self) -> dict:
        """Every split there is, by the name a data factory gives it (train_eval only when it differs)."""
        named = {"train": self.train, "test": self.test, "validation": self.validation, "train_eval": self.eval_train}
        return {name: split for name, split in named.items() if split is not None}

    def close(self) -> None:
        """End the data workers of every split's evaluation loader (streamed; nothing to do in memory)."""
        for split in self.named_splits().values():
            if isinstance(split, StreamedSplit):
                split.close()

    def batches(self, sampler, seed: int, comm):
        if self.streamed:
            return StreamedBatches(self.train, seed, self.augment, comm, seeded=self.user, reorder=sampler.reorder)
        return InMemoryBatches(self.train, sampler, self.augment, seed, comm)


def validation_indices(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): floor(fraction n) samples held out by a keyed draw that
    depends on n only, so every run on the same data holds out the same samples."""
    held = int(fraction * n)
    perm = torch.randperm(n, generator=order.keyed_generator(0, "validation", n))
    return perm[held:].sort().values, perm[:held].sort().values


def prepare(cfg) -> None:
    """What a dataset must write before it can be read (token files from data.text; nothing otherwise):
    one process does it, before the others read."""
    if cfg.factory is None and cfg.dataset == "tokens":
        tokens.prepare(cfg)


def keep_tokenizer(cfg, into) -> None:
    """A language model's tokenizer files into the run folder (token data; nothing otherwise)."""
    if cfg.factory is None and cfg.dataset == "tokens":
        tokens.keep_tokenizer(cfg, into)


def check_available(cfg) -> None:
    """Fail before any worker starts if the data is not where the recipe says."""
    if cfg.factory:
        return                                   # resolved (and called) by the launcher before workers
    if cfg.dataset == "tokens":
        tokens.check_available(cfg)
    elif cfg.dataset == "imagefolder":
        imagefolder.check_available(cfg)
    else:
        builtin.check_available(cfg)


class DataFingerprint:
    """A checkpoint part: what the run's data files were when it was written (token files: each one's size
    and a hash of three slices; other data: nothing, the recipe names it). A resume onto files that changed
    since (new text tokenized into the same folder) is refused in one line naming the file."""

    def __init__(self, cfg):
        self.value = tokens.fingerprint(cfg) if cfg.factory is None and cfg.dataset == "tokens" else {}

    def state_dict(self) -> dict:
        return {"files": self.value, "version": 1}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("files", {})
        for key, then in saved.items():
            now = self.value.get(key)
            if now != then:
                raise UserError(f"data.{key}: the token file changed since the checkpoint was written ({then['bytes']:,} "
                                f"bytes then, {now['bytes'] if now else 0:,} now, or other contents); allowed: the data "
                                "the run trained on (put it back), or another run name to train on this data")


def evaluation_subset(split, samples: int | None):
    """At most ``samples`` of ``split``, spread evenly over it (sample floor(i len / samples) for i < samples):
    the same samples at every evaluation, whatever the batch size and world size, so curves compare, and
    drawn from the whole split (a validation file's tail is one document; its windows spread are many). The
    split itself when it has no more than that."""
    if split is None or samples is None or samples >= len(split):
        return split
    picked = torch.arange(samples, dtype=torch.int64) * len(split) // samples
    if isinstance(split, TensorSplit):
        return split.subset(picked.to(split.labels.device))
    return StreamedSplit(torch.utils.data.Subset(split.base, picked.tolist()), split.device, split.dtype, split.workers)


def sizes(cfg) -> tuple[int, int]:
    """(training samples, test samples) as the run will see them (validation held out)."""
    if cfg.factory:
        obj = user_data(cfg)
        n, test = len(obj["train"]), len(obj["test"])
    elif cfg.dataset == "tokens":
        return tokens.sizes(cfg)                 # the validation file is its own: nothing held out
    elif cfg.dataset == "imagefolder":
        n, test = imagefolder.sizes(cfg)
    else:
        n, test = builtin.sizes(cfg)
    return n - int(cfg.validation * n), test


def user_data(cfg) -> dict:
    """A data factory's splits, checked: train and test map-style datasets, optional train_eval and
    num_classes (the contract; see the README)."""
    from launcher.config.factories import call, field
    obj = call("data.factory", cfg.factory, cfg.kwargs)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:      # (train, test), as most code writes it
        obj = {"train": obj[0], "test": obj[1]}
    out = {k: field(obj, k) for k in ("train", "test", "train_eval", "num_classes")}
    for key in ("train", "test", "train_eval"):
        ds = out[key]
        if ds is None and key == "train_eval":
            continue
        if not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")) or len(ds) == 0:
            raise UserError(f"data.factory: {cfg.factory!r} returned {key}={type(ds).__name__}; allowed: an object "
                            "with train and test map-style datasets (len() > 0, [i] -> (input, target)), optional "
                            "train_eval and num_classes")
    return out


def is_streamed(cfg) -> bool:
    """Read through DataLoader workers (``data.workers`` processes per rank), not held in memory."""
    return bool(cfg.factory) or cfg.dataset in ("imagefolder", "tokens") or cfg.stream


def load(cfg, device: torch.device, dtype: torch.dtype, is_first: bool = True) -> Dataset:
    """The recipe's data, on ``device``: in memory for the built-in sets (CIFAR is 600 MB as float32:
    fine on any GPU), streamed otherwise. With ``download``, call it on one process first
    (``is_first``), then on the others after a barrier."""
    if cfg.dataset == "tokens":
        train, val, vocab = tokens.load(cfg)
        split = lambda ds: StreamedSplit(ds, device, dtype, cfg.workers)  # noqa: E731
        return Dataset(split(train), split(val), vocab, None, tokens_per_sample=cfg.seq_len)
    if cfg.factory or cfg.dataset == "imagefolder":
        return _streamed(cfg, device, dtype)
    (xtr, ytr), (xte, yte), classes, augment = builtin.load(cfg, is_first)
    if cfg.stream:
        base = torch.utils.data.TensorDataset
        return _streamed(cfg, device, dtype, (base(xtr.to(dtype), ytr), base(xte.to(dtype), yte), None, classes, augment))
    move = lambda x, y: TensorSplit(x.to(device=device, dtype=dtype), y.to(device))  # noqa: E731
    train, validation = move(xtr, ytr), None
    if cfg.validation:
        keep, held = validation_indices(len(ytr), cfg.validation)
        train, validation = move(xtr[keep], ytr[keep]), move(xtr[held], ytr[held])
    return Dataset(train, move(xte, yte), classes, augment, validation)


def _streamed(cfg, device, dtype, parts=None) -> Dataset:
    if parts is None and cfg.factory:
        d = user_data(cfg)
        parts = (d["train"], d["test"], d["train_eval"], d["num_classes"], None)
    elif parts is None:
        train, test, classes, augment = imagefolder.load(cfg)
        parts = (train, test, None, classes, augment)
    train, test, train_eval, classes, augment = parts
    split = lambda ds: None if ds is None else StreamedSplit(ds, device, dtype, cfg.workers)  # noqa: E731
    validation = None
    if cfg.validation:
        keep, held = validation_indices(len(train), cfg.validation)
        subset = torch.utils.data.Subset
        validation = subset(train_eval or train, held.tolist())
        train_eval = subset(train_eval, keep.tolist()) if train_eval is not None else None
        train = subset(train, keep.tolist())
    return Dataset(split(train), split(test), classes, augment, split(validation), split(train_eval),
                   user=bool(cfg.factory))
