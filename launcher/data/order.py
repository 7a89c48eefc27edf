"""Data order and augmentation parameters: pure functions of a key, never of a global RNG.

* The order of epoch m is a permutation drawn from (seed, "order", m). Global batch k of epoch m covers
  positions [c_k, c_k + b_k) of it, c_k the samples the epoch consumed before it and b_k its batch (the
  last one may be partial): a batch that changes at any step keeps the order a function of the samples
  consumed alone. At a constant batch b that is [k b, (k+1) b), T_m = ceil(n/b) steps.
* Each rank takes a contiguous slice of a global batch (ceil or floor of size/world samples, possibly
  none) and cuts it into micro-batches.
* The random augmentation of sample i in epoch m (crop offsets, flip, rotation angle) is a function of
  (seed, m, i) alone, computed by a counter-based hash (splitmix64) for any set of indices at once.

So the sequence of global batches and every augmented pixel are the same whatever the world size, the
micro-batch x accumulation split, or the path the data takes (in memory, or streamed through
DataLoader workers), and resuming at (epoch, step) needs no saved sampler or RNG state: the plan says
where the step starts.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Purposes map to fixed numbers: str hashes are salted per process.
PURPOSES = {"order": 1, "augment": 2, "gradnorm": 3, "rank_rng": 4, "validation": 5, "sample": 6, "reorder": 7}
# 1: augmentation keyed on (seed, epoch, step, position in batch); 2: on (seed, epoch, index); 3: batches keyed
# on the samples consumed (a batch may change inside an epoch; at epoch boundaries the same order as 2)
VERSION = 3
READS = (1, 2, 3)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def keyed_generator(seed: int, *key, device="cpu") -> torch.Generator:
    """A torch.Generator seeded from (seed, key...), stable across processes and runs."""
    words = [seed] + [PURPOSES[k] if isinstance(k, str) else int(k) for k in key]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection of uint64 that scrambles every bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_bits(seed: int, purpose: str, epoch: int, indices, lanes: int) -> np.ndarray:
    """uint64 words, shape (len(indices), lanes): a pure function of (seed, purpose, epoch, index, lane)."""
    with np.errstate(over="ignore"):
        base = np.uint64(0)
        for word in (seed, PURPOSES[purpose], epoch):
            base = _mix(np.asarray(base + np.uint64(word % 2 ** 64) * _GOLDEN + _GOLDEN, dtype=np.uint64))
        idx = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
        counter = idx * np.uint64(lanes) + np.arange(lanes, dtype=np.uint64) + np.uint64(1)
        return _mix(base + counter * _GOLDEN)


def keyed_uniform(seed: int, purpose: str, epoch: int, indices, lanes: int) -> np.ndarray:
    """Uniform floats in [0, 1), shape (len(indices), lanes): a pure function of
    (seed, purpose, epoch, index, lane), vectorised over indices."""
    bits = keyed_bits(seed, purpose, epoch, indices, lanes)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random transforms in epoch ``epoch`` (streamed data): the same
    hash as :func:`keyed_bits`, in plain integers (one sample at a time, in a DataLoader worker)."""
    mask = 2 ** 64 - 1

    def mix(x):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)
    golden, base = int(_GOLDEN), 0
    for word in (seed, PURPOSES["sample"], epoch):
        base = mix((base + (word % 2 ** 64) * golden + golden) & mask)
    return mix((base + (index + 1) * golden) & mask) >> 1


# ------------------------------------------------------------------------------------------------
# Order

@dataclass(frozen=True)
class Reorder:
    """Another order of the same data from a point on (a branch's seed, ``qhm-launch branch --seeds``): from
    position ``offset`` of epoch ``epoch``'s permutation on, the samples the epoch has left come in an
    order drawn from (seed, "reorder", ``draw``, epoch), and every later epoch's permutation from the
    same key. What came before is the run's own order, and each epoch still holds every sample once."""
    epoch: int
    offset: int
    draw: int


class GlobalBatchSampler:
    """Epoch m's permutation, from which global batch k takes positions [c_k, c_k + b_k).

    Stateful only in what a resume must agree on (n, seed and the order version): the position itself
    lives in the train state. Loading a checkpoint of another dataset size or seed is refused.
    ``reorder``: another order from a point on (:class:`Reorder`); None: the seed's.
    """

    def __init__(self, n: int, seed: int, device="cpu", reorder: Reorder | None = None):
        self.n, self.seed, self.device, self.reorder = n, seed, torch.device(device), reorder
        self._epoch, self._perm = None, None

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order, cached on ``device`` (one transfer per epoch, none per step)."""
        if self._epoch != epoch:
            perm = torch.randperm(self.n, generator=keyed_generator(self.seed, "order", epoch))
            r = self.reorder
            if r is not None and epoch >= r.epoch:
                again = keyed_generator(self.seed, "reorder", r.draw, epoch)
                if epoch > r.epoch:
                    perm = torch.randperm(self.n, generator=again)
                else:
                    left = perm[r.offset:]
                    perm = torch.cat([perm[:r.offset], left[torch.randperm(len(left), generator=again)]])
            self._perm, self._epoch = perm.to(self.device), epoch
        return self._perm

    def global_batch(self, epoch: int, step: int, batch: int) -> torch.Tensor:
        """Global batch ``step`` of epoch ``epoch`` at a constant ``batch``: [step b, (step + 1) b)."""
        return self.permutation(epoch)[step * batch:(step + 1) * batch]

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "version": VERSION}

    def load_state_dict(self, state: dict) -> None:
        """Refuse a checkpoint of other data, or of an order this launcher does not know (a newer one).
        One written before the order was recorded (layout 1) is accepted; from it on, augmentation is
        keyed per sample, and orders 2 and 3 are the same wherever the batch changes at epoch boundaries,
        the only changes order 2 had (see VERSION)."""
        from launcher.errors import UserError
        version = state.get("version", 2)
        if version not in READS:
            raise UserError(f"checkpoint: its data order is version {version!r}, this launcher reads "
                            f"{', '.join(map(str, READS))}; allowed: resume it with the launcher that wrote it")
        if state["n"] is None:
            return
        if state["n"] != self.n:
            raise UserError(f"data: the checkpoint was written for {state['n']} training samples, this dataset "
                            f"has {self.n}; allowed: the same data (or another run name)")
        if state["seed"] != self.seed:
            raise UserError(f"seed: the checkpoint's data order uses seed {state['seed']}, the recipe {self.seed}")


def rank_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous slice [lo, hi) of a global batch of ``size`` samples.

    Ranks get floor(size/world) or ceil(size/world) samples (the first ``size % world`` ranks one
    more); when the batch is smaller than the world, the last ranks get none and still join the
    gradient reduce with zero gradients.
    """
    q, r = divmod(size, world)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def batch_start(stage, step: int) -> int:
    """Where global batch ``step`` of a stage starts in its epoch's permutation: the stage's ``offset``
    plus its steps before at ``batch`` each (a stage that is a whole epoch: first and offset 0)."""
    return getattr(stage, "offset", 0) + (step - getattr(stage, "first", 0)) * stage.batch


def stage_end(stage) -> int:
    """The step of the epoch after a stage's last."""
    return getattr(stage, "first", 0) + stage.steps


def micro_batches(lo: int, hi: int, micro: int) -> list[tuple[int, int]]:
    """[lo, hi) cut into micro-batches of ``micro``; one empty one when the slice is empty."""
    return [(a, min(a + micro, hi)) for a in range(lo, hi, micro)] or [(lo, lo)]


# ------------------------------------------------------------------------------------------------
# Augmentation

@dataclass(frozen=True)
class Augment:
    """Random crop to the original size after padding ``pad`` on every side, a horizontal flip (with
    probability 1/2), and a rotation by a uniform angle in [-rotate, rotate] degrees (nearest pixel,
    about the centre), in that order, as torchvision's RandomCrop, RandomHorizontalFlip and
    RandomRotation. Padding and the corners a rotation uncovers take ``fill`` (per channel: the value a
    black pixel has after normalisation, as torchvision pads before normalising)."""
    pad: int
    flip: bool
    rotate: float = 0.0
    fill: tuple = ()

    @property
    def lanes(self) -> int:
        return 4


def augment_params(seed: int, epoch: int, indices, aug: Augment, purpose: str = "augment") -> torch.Tensor:
    """(len(indices), 4) float64: crop row offset, crop column offset, flip (0/1), angle in degrees,
    for the given dataset indices in epoch ``epoch``. A pure function of (seed, purpose, epoch, index)."""
    u = keyed_uniform(seed, purpose, epoch, np.asarray(indices), aug.lanes)
    span = 2 * aug.pad + 1
    out = np.empty_like(u)
    out[:, 0] = np.floor(u[:, 0] * span)
    out[:, 1] = np.floor(u[:, 1] * span)
    out[:, 2] = (u[:, 2] < 0.5) if aug.flip else 0.0
    out[:, 3] = (2.0 * u[:, 3] - 1.0) * aug.rotate
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=32)
def fill_tensor(fill: tuple, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The per-channel fill value on ``device``, made once: building it from a list at every micro-batch
    is a host-to-device copy, which synchronises the host with the GPU."""
    return torch.as_tensor(fill or [0.0] * channels, dtype=dtype, device=device)


def apply_augment(x: torch.Tensor, params: torch.Tensor, aug: Augment) -> torch.Tensor:
    """Crop, flip and rotate a batch (B, C, H, W) by per-sample ``params`` from :func:`augment_params`.

    Written here rather than with torchvision's transforms because theirs draw from the global RNG one
    sample at a time; these parameters come from the keyed hash, for a whole batch at once, on any device.
    """
    if len(x) == 0:
        return x
    B, C, H, W = x.shape
    params = params.to(x.device)
    fill = fill_tensor(tuple(aug.fill), C, x.dtype, x.device).view(1, C, 1, 1)
    p = aug.pad
    shifted = F.pad(x - fill, (p, p, p, p))                      # pad with the fill value, in effect
    rows = (params[:, 0].long()[:, None] + torch.arange(H, device=x.device))[:, None, :, None]
    cols = (params[:, 1].long()[:, None] + torch.arange(W, device=x.device))[:, None, None, :]
    out = shifted[torch.arange(B, device=x.device)[:, None, None, None],
                  torch.arange(C, device=x.device)[None, :, None, None], rows, cols]
    out = torch.where(params[:, 2].bool()[:, None, None, None], out.flip(-1), out)
    if aug.rotate:
        out = _rotate(out, params[:, 3])
    return out + fill


def apply_augment_one(x: torch.Tensor, params: torch.Tensor, aug: Augment) -> torch.Tensor:
    """:func:`apply_augment` for one sample (C, H, W), by slicing instead of gathering: the same
    pixels, at a fraction of the cost (what a DataLoader worker does per sample)."""
    C, H, W = x.shape
    fill = torch.as_tensor(aug.fill or [0.0] * C, dtype=x.dtype).view(C, 1, 1)
    p = aug.pad
    padded = F.pad((x - fill).unsqueeze(0), (p, p, p, p))[0]
    top, left = int(params[0]), int(params[1])
    out = padded[:, top:top + H, left:left + W]
    if params[2]:
        out = out.flip(-1)
    if aug.rotate:
        out = _rotate(out.unsqueeze(0), params[3:4])[0]
    return out + fill


def _rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise by its angle about its centre, nearest pixel, zeros outside
    (the caller has shifted by the fill value, so zero is the fill)."""
    rad = degrees.to(torch.float64) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    # grid_sample maps output to input coordinates: the inverse rotation (y axis points down)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
