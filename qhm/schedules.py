r"""The paper's schedules (equations 1-12): pure functions of the epoch index m in [0, M-1].

Each schedule is a frozen dataclass validated on construction; ``values(m)`` takes an int or a numpy
array of epochs (vectorised, one formula serves both), ``schedule(m)`` gives one Python number.

We follow the paper's formulas. Where the paper's own code differs we do not copy it: its batch, beta
and gamma schedulers are off by one (the first stage lasts E + 1 epochs), and its text prints
lambda = zeta = 2 where the code uses 0.5 (a factor in (0, 1) is what equations 9 and 12 require).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BatchSchedule", "LRSchedule", "BetaSchedule", "GammaSchedule", "ScheduleError",
           "BATCH_KINDS", "LR_KINDS", "BETA_KINDS", "GAMMA_KINDS"]

BATCH_KINDS = ("constant", "exponential")
MAX_BATCH = 2 ** 62
LR_KINDS = ("constant", "sqrt_decay", "decay", "cosine", "polynomial")
BETA_KINDS = ("constant", "step_decay", "increasing")
GAMMA_KINDS = ("constant", "step_decay")


class ScheduleError(ValueError):
    """A schedule parameter out of range: ``field`` (e.g. ``batch.growth``), the ``value`` given and what
    is ``allowed``, so a caller can name its own key for the field without reading the message."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f"{field}={value!r}: must be {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


def _require(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ScheduleError(field, value, allowed)


def _kind(kind: str, kinds: tuple, field: str) -> None:
    _require(kind in kinds, field, kind, "one of " + ", ".join(kinds))


def _stage(m, interval: int):
    return np.floor_divide(np.asarray(m), interval)


def _check_interval(interval) -> None:
    _require(isinstance(interval, int) and interval >= 1, "interval", interval, "an integer >= 1")


def _step_decay(top: float, factor: float, m, interval: int):
    """top * factor^floor(m/E): equations (9) and (12)."""
    return top * np.power(factor, _stage(m, interval).astype(np.float64))


class _Scalar:
    def __call__(self, m: int):
        return self.values(np.asarray(m)).item()


@dataclass(frozen=True)
class BatchSchedule(_Scalar):
    """Batch size b'_m: constant b (eq. 1) or exponential b_0 * delta^floor(m/E) (eq. 2).

    ``size`` is b (constant) or b_0 (exponential). A non-integer product is rounded *up*: a batch holds
    whole samples, and b'_m >= b_0 delta^floor(m/E) keeps every bound stated for eq. (2) true (rounding to
    the nearest, 3 * 1.5 = 4.5 -> 4, puts the batch below it and the exponential-batch forms fail).
    A batch beyond MAX_BATCH (2^62) is refused rather than wrapped around to a negative number.
    """
    kind: str = "constant"
    size: int = 128
    growth: float = 2.0      # delta
    interval: int = 1        # E

    def __post_init__(self):
        _kind(self.kind, BATCH_KINDS, "batch.kind")
        _require(isinstance(self.size, int) and self.size >= 1, "batch.size", self.size, "an integer >= 1")
        _require(self.growth > 1, "batch.growth", self.growth, "> 1")
        _check_interval(self.interval)

    def values(self, m):
        if self.kind == "constant":
            return np.full(np.shape(m), self.size, dtype=np.int64)
        with np.errstate(over="ignore"):
            exact = self.size * np.power(float(self.growth), _stage(m, self.interval))
        batch = np.ceil(exact * (1.0 - 1e-15))           # 8 * 2**k is exact; 3 * 1.5 = 4.5 -> 5
        if np.any(~(batch <= MAX_BATCH)):
            first = int(np.flatnonzero(np.ravel(~(batch <= MAX_BATCH)))[0])
            epoch = int(np.ravel(np.asarray(m))[first])
            raise ScheduleError("batch.growth", self.growth, "small enough that b_0 delta^floor(m/E) stays below "
                                f"2^62 over the run (it passes it at epoch {epoch})")
        return batch.astype(np.int64)


@dataclass(frozen=True)
class LRSchedule(_Scalar):
    r"""Learning rate alpha'_m (eqs. 3-7) over M = ``epochs`` epochs, with optional linear warm-up.

    constant: alpha_max; sqrt_decay: alpha_max/sqrt(m+1); decay: alpha_max/(m+1);
    cosine: alpha_min + (alpha_max-alpha_min)/2 (1 + cos(m pi/(M-1))), alpha_max when M = 1;
    polynomial: alpha_min + (alpha_max-alpha_min)(1 - m/M)^p.
    Warm-up (off by default, so the paper's schedules are untouched): for m < w the value is
    multiplied by (m+1)/(w+1), reaching the schedule's own value at epoch w.
    """
    kind: str = "constant"
    max: float = 0.1
    min: float = 0.0
    power: float = 2.0
    epochs: int = 1          # M
    warmup: int = 0          # w

    def __post_init__(self):
        _kind(self.kind, LR_KINDS, "lr.kind")
        _require(self.max >= 0, "lr.max", self.max, ">= 0")
        _require(0 <= self.min <= self.max, "lr.min", self.min, f"in [0, lr.max={self.max}]")
        _require(self.power > 0, "lr.power", self.power, "> 0")
        _require(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _require(isinstance(self.warmup, int) and 0 <= self.warmup < self.epochs, "lr.warmup", self.warmup,
                 f"an integer in [0, epochs={self.epochs})")

    def values(self, m):
        m = np.asarray(m, dtype=np.float64)
        hi, lo, M = self.max, self.min, self.epochs
        if self.kind == "constant":
            out = np.full(m.shape, hi)
        elif self.kind == "sqrt_decay":
            out = hi / np.sqrt(m + 1)
        elif self.kind == "decay":
            out = hi / (m + 1)
        elif self.kind == "cosine":
            out = np.full(m.shape, hi) if M == 1 else lo + (hi - lo) / 2 * (1 + np.cos(m * math.pi / (M - 1)))
        else:
            out = lo + (hi - lo) * (1 - m / M) ** self.power
        if self.warmup:
            out = out * np.minimum(1.0, (m + 1) / (self.warmup + 1))
        return out


@dataclass(frozen=True)
class BetaSchedule(_Scalar):
    """beta'_m: constant beta_max (eq. 8), step decay beta_max zeta^floor(m/E) (eq. 9), or
    increasing 1 - (1 - beta_min)/(m+1)^(3/4) (eq. 10, per epoch as the text writes it).

    ``staged=True`` makes the increasing schedule move in stages of E epochs, as the paper's code does:
    1 - (1 - beta_min)/(floor(m/E)+1)^(3/4) (without that code's off-by-one first stage).
    """
    kind: str = "constant"
    max: float = 0.9
    min: float = 0.5
    factor: float = 0.5      # zeta
    interval: int = 1        # E
    staged: bool = False

    def __post_init__(self):
        _kind(self.kind, BETA_KINDS, "beta.kind")
        _require(0 <= self.max < 1, "beta.max", self.max, "in [0, 1)")
        _require(0 <= self.min < 1, "beta.min", self.min, "in [0, 1)")
        _require(0 < self.factor < 1, "beta.factor", self.factor, "in (0, 1)")
        _check_interval(self.interval)

    def values(self, m):
        m = np.asarray(m)
        if self.kind == "constant":
            return np.full(m.shape, float(self.max))
        if self.kind == "step_decay":
            return _step_decay(self.max, self.factor, m, self.interval)
        index = _stage(m, self.interval) if self.staged else m
        return 1 - (1 - self.min) / np.power(index + 1.0, 0.75)


@dataclass(frozen=True)
class GammaSchedule(_Scalar):
    """gamma'_m: constant gamma_max (eq. 11) or step decay gamma_max lambda^floor(m/E) (eq. 12)."""
    kind: str = "constant"
    max: float = 0.7
    factor: float = 0.5      # lambda
    interval: int = 1        # E

    def __post_init__(self):
        _kind(self.kind, GAMMA_KINDS, "gamma.kind")
        _require(0 <= self.max <= 1, "gamma.max", self.max, "in [0, 1]")
        _require(0 < self.factor < 1, "gamma.factor", self.factor, "in (0, 1)")
        _check_interval(self.interval)

    def values(self, m):
        m = np.asarray(m)
        if self.kind == "constant":
            return np.full(m.shape, float(self.max))
        return _step_decay(self.max, self.factor, m, self.interval)
