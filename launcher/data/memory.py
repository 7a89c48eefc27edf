"""The in-memory path: a dataset held whole as tensors on the device (the fast path for CIFAR on a GPU).

A global batch's samples are gathered by index on the device and augmented there with the keyed
parameters, which are computed once per epoch for every sample (no host work per step).
"""
from __future__ import annotations

import torch

from launcher.data import order


class TensorSplit:
    """Images and labels as tensors; ``batch(a, b)`` is a contiguous slice, ``gather(idx)`` any samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, a: int, b: int):
        return self.images[a:b], self.labels[a:b]

    def shard(self, lo: int, hi: int, batch_size: int):
        """(a, b, x, y) over [lo, hi), ``batch_size`` samples at a time."""
        for a in range(lo, hi, batch_size):
            b = min(a + batch_size, hi)
            yield a, b, self.images[a:b], self.labels[a:b]

    def gather(self, idx: torch.Tensor):
        return self.images[idx], self.labels[idx]

    def subset(self, idx: torch.Tensor) -> "TensorSplit":
        return TensorSplit(self.images[idx], self.labels[idx])

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.images.shape[1:])


class InMemoryBatches:
    """This rank's micro-batches of each global batch, gathered from a :class:`TensorSplit`."""

    def __init__(self, split: TensorSplit, sampler: order.GlobalBatchSampler, augment, seed: int, comm):
        self.split, self.sampler, self.augment, self.seed = split, sampler, augment, seed
        self.rank, self.world = comm.rank, comm.world
        self._epoch, self._params, self._cut_cache = None, None, {}

    def start_epoch(self, epoch: int, first_step: int, stage) -> None:
        """Epoch ``epoch`` starts (or resumes) at ``first_step``: its augmentation table, once."""
        if self.augment is not None and self._epoch != epoch:
            params = order.augment_params(self.seed, epoch, range(len(self.split)), self.augment)
            self._params = params.to(self.split.images.device, self.split.images.dtype)
        self._epoch = epoch

    def probe_batch(self, m: int):
        """``m`` training samples (repeated when the set is smaller), un-augmented: a batch of the right
        shape for probing device memory."""
        idx = torch.arange(m, device=self.split.images.device) % len(self.split)
        return self.split.gather(idx)

    def close(self) -> None:
        """Nothing runs beside the rank here (the streamed counterpart ends its workers)."""

    def step(self, epoch: int, step: int, stage) -> tuple[int, list]:
        """(global batch size, [(x, y) per micro-batch of this rank]); one empty micro-batch when this
        rank has no sample of the batch (it still joins the gradient reduce)."""
        perm, first = self.sampler.permutation(epoch), order.batch_start(stage, step)
        size = min(stage.batch, len(perm) - first)
        out = []
        for a, b in self._cuts(size, stage.micro_batch):
            idx = perm[first + a:first + b]          # this micro-batch's samples: one slice of the order
            x, y = self.split.gather(idx)
            if self.augment is not None:
                x = order.apply_augment(x, self._params[idx], self.augment)
            out.append((x, y))
        return size, out

    def _cuts(self, size: int, micro: int) -> list[tuple[int, int]]:
        """This rank's micro-batches [a, b) of a global batch of ``size`` (the same at every full step:
        worked out once)."""
        key = size, micro
        if key not in self._cut_cache:
            self._cut_cache[key] = order.micro_batches(*order.rank_bounds(size, self.rank, self.world), micro)
        return self._cut_cache[key]
