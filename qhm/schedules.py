r"""The paper's schedules (equations 1-12): pure functions of the position u.

The paper indexes every schedule by the epoch m in [0, M-1], and so do these in the unit ``epoch`` (the
default, exactly the paper's staircase). In the units ``step``, ``sample`` and ``token`` the position is
the optimizer steps, samples or tokens consumed before a step, and the same formulas evaluate there:
a step decay's stage is floor(u/E) with E counted in the unit, sqrt/linear decay are alpha/sqrt(u+1)
and alpha/(u+1), and cosine and polynomial run over the run's length U in the unit (cosine reaches its
minimum at u = U, the run's end, where the paper's epoch form reaches it at the last epoch m = M-1).
Beside the paper's kinds: a piecewise batch (``steps``: the batch of the last point at or before u,
Megatron's and OLMo's batch schedules, Merrill et al.'s batch warmup) and warmup-stable-decay LR.

Each schedule is a frozen dataclass validated on construction; ``values(u)`` takes an int or a numpy
array of positions (vectorised, one formula serves both), ``schedule(u)`` gives one Python number.

We follow the paper's formulas. Where the paper's own code differs we do not copy it: its batch, beta
and gamma schedulers are off by one (the first stage lasts E + 1 epochs), and its text prints
lambda = zeta = 2 where the code uses 0.5 (a factor in (0, 1) is what equations 9 and 12 require).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BatchSchedule", "LRSchedule", "BetaSchedule", "GammaSchedule", "ScheduleError",
           "BATCH_KINDS", "LR_KINDS", "BETA_KINDS", "GAMMA_KINDS", "UNITS", "BATCH_SCALINGS"]

UNITS = ("epoch", "step", "sample", "token")
BATCH_KINDS = ("constant", "exponential", "steps")
MAX_BATCH = 2 ** 62
LR_KINDS = ("constant", "sqrt_decay", "decay", "cosine", "polynomial", "wsd")
BATCH_SCALINGS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}     # lr x (b_k / b_0)^power at a batch change
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
    def values(self, m: np.ndarray) -> np.ndarray:       # each schedule's, over an array of positions
        raise NotImplementedError

    def __call__(self, m: int):
        return self.values(np.asarray(m)).item()


@dataclass(frozen=True)
class BatchSchedule(_Scalar):
    """Batch size b'(u): constant b (eq. 1), exponential b_0 * delta^floor(u/E) (eq. 2), or piecewise
    (``steps``): ``points`` ((u_0 = 0, b_0), (u_1, b_1), ...), positions strictly increasing, the batch of
    the last point at or before u.

    ``size`` is b (constant) or b_0 (exponential). A non-integer product is rounded *up*: a batch holds
    whole samples, and b'_m >= b_0 delta^floor(m/E) keeps every bound stated for eq. (2) true (rounding to
    the nearest, 3 * 1.5 = 4.5 -> 4, puts the batch below it and the exponential-batch forms fail).
    A batch beyond MAX_BATCH (2^62) is refused rather than wrapped around to a negative number.
    """
    kind: str = "constant"
    size: int = 128
    growth: float = 2.0      # delta
    interval: int = 1        # E
    points: tuple = ()       # steps: ((position, batch), ...)

    def __post_init__(self):
        _kind(self.kind, BATCH_KINDS, "batch.kind")
        if self.kind == "steps":
            _check_points(self.points)
            return
        _require(isinstance(self.size, int) and self.size >= 1, "batch.size", self.size, "an integer >= 1")
        _require(self.growth > 1, "batch.growth", self.growth, "> 1")
        _check_interval(self.interval)

    def values(self, m):
        if self.kind == "constant":
            return np.full(np.shape(m), self.size, dtype=np.int64)
        if self.kind == "steps":
            at = np.asarray([p for p, _ in self.points], dtype=np.int64)
            batches = np.asarray([b for _, b in self.points], dtype=np.int64)
            return batches[np.searchsorted(at, np.asarray(m, dtype=np.int64), side="right") - 1]
        with np.errstate(over="ignore"):
            exact = self.size * np.power(float(self.growth), _stage(m, self.interval))
        batch = np.ceil(exact * (1.0 - 1e-15))           # 8 * 2**k is exact; 3 * 1.5 = 4.5 -> 5
        if np.any(~(batch <= MAX_BATCH)):
            first = int(np.flatnonzero(np.ravel(~(batch <= MAX_BATCH)))[0])
            epoch = int(np.ravel(np.asarray(m))[first])
            raise ScheduleError("batch.growth", self.growth, "small enough that b_0 delta^floor(m/E) stays below "
                                f"2^62 over the run (it passes it at epoch {epoch})")
        return batch.astype(np.int64)

    def next_change(self, u: int):
        """The first position after ``u`` where the batch may change (None: never)."""
        if self.kind == "constant":
            return None
        if self.kind == "steps":
            return next((p for p, _ in self.points if p > u), None)
        return (u // self.interval + 1) * self.interval


def _check_points(points) -> None:
    """A piecewise batch: ((0, b_0), (u_1, b_1), ...), integer positions strictly increasing from 0,
    integer batches >= 1."""
    _require(isinstance(points, tuple) and len(points) >= 1, "batch.points", points,
             "a list of [position, batch] pairs, the first at position 0")
    last = -1
    for i, point in enumerate(points):
        _require(isinstance(point, tuple) and len(point) == 2, f"batch.points[{i}]", point, "a pair [position, batch]")
        position, batch = point
        _require(isinstance(position, int) and not isinstance(position, bool) and position >= 0,
                 f"batch.points[{i}]", point, "an integer position >= 0")
        _require(i > 0 or position == 0, "batch.points[0]", point, "at position 0 (the batch the run starts with)")
        _require(position > last, f"batch.points[{i}]", point,
                 f"a position after the previous point's ({last}): positions strictly increasing")
        _require(isinstance(batch, int) and not isinstance(batch, bool) and 1 <= batch <= MAX_BATCH,
                 f"batch.points[{i}]", point, "an integer batch >= 1")
        last = position


@dataclass(frozen=True)
class LRSchedule(_Scalar):
    r"""Learning rate alpha'(u) (eqs. 3-7), with optional linear warm-up.

    In the unit ``epoch``, over M = ``epochs`` epochs (the paper): constant: alpha_max; sqrt_decay:
    alpha_max/sqrt(m+1); decay: alpha_max/(m+1); cosine: alpha_min + (alpha_max-alpha_min)/2
    (1 + cos(m pi/(M-1))), alpha_max when M = 1; polynomial: alpha_min + (alpha_max-alpha_min)(1 - m/M)^p.
    In the other units, u the steps, samples or tokens before a step and U = ``length`` the run's length
    in them: the same forms with u for m, cosine alpha_min + (alpha_max-alpha_min)/2 (1 + cos(u pi/U)) and
    polynomial alpha_min + (alpha_max-alpha_min)(1 - u/U)^p. In either unit, wsd (warmup-stable-decay):
    alpha_max until the last ``decay`` units, then linear down to alpha_min at the run's end:
    alpha_min + (alpha_max-alpha_min) min(1, (U-u)/decay) (U = M in epochs).
    Warm-up (off by default, so the paper's schedules are untouched): for u < w the value is
    multiplied by (u+1)/(w+1), reaching the schedule's own value at u = w.
    """
    kind: str = "constant"
    max: float = 0.1
    min: float = 0.0
    power: float = 2.0
    epochs: int = 1          # M
    warmup: int = 0          # w
    unit: str = "epoch"
    length: int = 0          # U: the run's length in ``unit`` (the other units; epochs: M)
    decay: int = 0           # wsd: the length of the final decay, in ``unit``

    def __post_init__(self):
        _kind(self.kind, LR_KINDS, "lr.kind")
        _kind(self.unit, UNITS, "unit")
        _require(self.max >= 0, "lr.max", self.max, ">= 0")
        _require(0 <= self.min <= self.max, "lr.min", self.min, f"in [0, lr.max={self.max}]")
        _require(self.power > 0, "lr.power", self.power, "> 0")
        _require(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        span = self.epochs if self.unit == "epoch" else self.length
        if self.unit != "epoch":
            _require(isinstance(self.length, int) and self.length >= 1, "length", self.length,
                     f"an integer >= 1 (the run's length in {self.unit}s)")
        what = "epochs" if self.unit == "epoch" else f"the run's {span} {self.unit}s"
        _require(isinstance(self.warmup, int) and 0 <= self.warmup < span, "lr.warmup", self.warmup,
                 f"an integer in [0, {what})" if self.unit != "epoch" else f"an integer in [0, epochs={span})")
        _require(isinstance(self.decay, int) and 0 <= self.decay <= span, "lr.decay", self.decay,
                 f"an integer in [0, {what}]")

    def values(self, m):
        m = np.asarray(m, dtype=np.float64)
        hi, lo = self.max, self.min
        M = self.epochs if self.unit == "epoch" else self.length
        if self.kind == "constant":
            out = np.full(m.shape, hi)
        elif self.kind == "sqrt_decay":
            out = hi / np.sqrt(m + 1)
        elif self.kind == "decay":
            out = hi / (m + 1)
        elif self.kind == "cosine" and self.unit == "epoch":
            out = np.full(m.shape, hi) if M == 1 else lo + (hi - lo) / 2 * (1 + np.cos(m * math.pi / (M - 1)))
        elif self.kind == "cosine":
            out = lo + (hi - lo) / 2 * (1 + np.cos(m * math.pi / M))
        elif self.kind == "wsd":
            left = np.clip((M - m) / self.decay, 0.0, 1.0) if self.decay else np.ones(m.shape)
            out = lo + (hi - lo) * left
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
