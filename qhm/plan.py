r"""The schedule expanded over training: per epoch, and per step, as the paper defines them.

Epoch m runs T_m = ceil(n / b'_m) steps at (b'_m, alpha'_m, beta'_m, gamma'_m); the step-indexed
sequences b_k, alpha_k, beta_k, gamma_k repeat each epoch's value T_m times, K = sum_m T_m.

In the units step, sample and token the batch may change inside an epoch: :func:`plan_steps` walks the
run as *spans*, the steps of one epoch at one batch. Global batch k of an epoch covers positions
[c_k, c_k + b_k) of the epoch's permutation, c_k the samples the epoch consumed before it (the last one
may be partial), so a change at any step keeps the order a function of the samples consumed alone. A
schedule that changes only at epoch boundaries is one span per epoch at offset 0: the paper's plan.

Whole epochs in a row at one batch (units step, sample, token: a batch held over many epochs of a small
corpus) are one span that ``repeat``\ s: the walk jumps over them in one step, so a plan costs its number of
batch changes, not its number of epochs (10^15 tokens of a 1,000-window corpus plans at once).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .schedules import BATCH_SCALINGS, UNITS, BatchSchedule, BetaSchedule, GammaSchedule, LRSchedule, ScheduleError

__all__ = ["Schedule", "EpochTable", "StepSequences", "epoch_table", "step_sequences",
           "apply_hyperparams", "inverse_batch_sums", "Span", "StepPlan", "plan_steps", "MAX_SPANS",
           "BatchTooLarge"]

MAX_SPANS = 5_000_000         # a plan with more spans (a batch changing at nearly every step) is refused


class BatchTooLarge(ScheduleError):
    """The batch passes the training set's ``n`` samples: ``batch`` at position ``position`` in ``unit``."""

    def __init__(self, batch: int, n: int, unit: str, position: int):
        super().__init__("batch", batch, f"at most the {n} training samples (it reaches {batch} at {unit} {position})")
        self.batch, self.n, self.unit, self.position = batch, n, unit, position


@dataclass(frozen=True)
class Schedule:
    """Batch, LR, beta and gamma schedules over ``epochs`` = M epochs, each a function of the position in
    ``unit`` (the epoch: the paper). ``batch_scaling``: the LR is multiplied by (b_k / b_0)^p, p 0 (none),
    1/2 (sqrt) or 1 (linear), b_0 the batch at position 0."""
    epochs: int
    batch: BatchSchedule
    lr: LRSchedule
    beta: BetaSchedule
    gamma: GammaSchedule
    unit: str = "epoch"
    batch_scaling: str = "none"

    def __post_init__(self):
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ScheduleError("epochs", self.epochs, "an integer >= 1")
        if self.lr.epochs != self.epochs:
            raise ScheduleError("lr.epochs", self.lr.epochs, f"equal to epochs={self.epochs}")
        if self.unit not in UNITS:
            raise ScheduleError("unit", self.unit, "one of " + ", ".join(UNITS))
        if self.lr.unit != self.unit:
            raise ScheduleError("lr.unit", self.lr.unit, f"equal to unit={self.unit}")
        if self.batch_scaling not in BATCH_SCALINGS:
            raise ScheduleError("lr.batch_scaling", self.batch_scaling, "one of " + ", ".join(BATCH_SCALINGS))
        if self.unit == "epoch":
            self.batch.values(np.arange(self.epochs))       # raises if the batch outgrows an int64

    def hyperparams(self, u, batch, first_batch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(alpha, beta, gamma) at positions ``u`` for steps at batches ``batch`` (arrays alike);
        ``first_batch``: b_0 of the LR's batch scaling (default: the schedule's batch at 0)."""
        lr = self.lr.values(u)
        power = BATCH_SCALINGS[self.batch_scaling]
        if power:
            base = float(first_batch if first_batch is not None else self.batch(0))
            lr = lr * np.power(np.asarray(batch, dtype=np.float64) / base, power)
        return lr, self.beta.values(u), self.gamma.values(u)


@dataclass(frozen=True)
class EpochTable:
    """One row per epoch m: batch b'_m, steps T_m, alpha'_m, beta'_m, gamma'_m (numpy arrays)."""
    epoch: np.ndarray
    batch: np.ndarray
    steps: np.ndarray
    lr: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    n: int

    @property
    def total_steps(self) -> int:
        return int(self.steps.sum())

    @property
    def total_samples(self) -> int:
        """SFO calls: every epoch computes n per-sample gradients, whatever its batch size."""
        return int(self.n) * len(self.epoch)

    def row(self, m: int) -> dict:
        return {"epoch": int(self.epoch[m]), "batch": int(self.batch[m]), "steps": int(self.steps[m]),
                "lr": float(self.lr[m]), "beta": float(self.beta[m]), "gamma": float(self.gamma[m])}


@dataclass(frozen=True)
class StepSequences:
    """alpha_k, beta_k, gamma_k, b_k for k in [0, K-1] (numpy arrays of length K)."""
    lr: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    batch: np.ndarray


def epoch_table(schedule: Schedule, n: int, batches=None) -> EpochTable:
    """The schedule per epoch. ``batches``: the batch of each epoch as a run actually used it (a batch
    decided at run time, ``schedule.batch.kind: adaptive``), for the epochs it trained; the table then
    covers those epochs, with the schedule's learning rate, beta and gamma at them."""
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ValueError(f"n={n!r}: the training-set size must be an integer >= 1")
    if batches is None:
        m = np.arange(schedule.epochs)
        batch = schedule.batch.values(m)
    else:
        batch = np.asarray(batches, dtype=np.int64)
        if not (1 <= len(batch) <= schedule.epochs and np.all(batch >= 1)):
            raise ValueError(f"batches={list(batches)!r}: one batch >= 1 per epoch, at most {schedule.epochs}")
        m = np.arange(len(batch))
    return EpochTable(epoch=m, batch=batch, steps=-(-int(n) // batch), lr=schedule.lr.values(m),
                      beta=schedule.beta.values(m), gamma=schedule.gamma.values(m), n=int(n))


def step_sequences(table) -> StepSequences:
    """The per-step sequences: of an :class:`EpochTable` (each epoch's values repeated T_m times), or of a
    :class:`StepPlan` with the schedule its steps follow (``table.sequences``)."""
    if isinstance(table, StepPlan):
        raise TypeError("a StepPlan: call plan.sequences(schedule)")
    rep = table.steps
    return StepSequences(lr=np.repeat(table.lr, rep), beta=np.repeat(table.beta, rep),
                         gamma=np.repeat(table.gamma, rep), batch=np.repeat(table.batch, rep))


def inverse_batch_sums(table: EpochTable) -> tuple[np.ndarray, np.ndarray]:
    """Per epoch: (sum over its steps of 1/b_k as the bounds take it, b_k = b'_m for all T_m steps;
    the same sum over the batches actually drawn, the last one partial: n - (T_m - 1) b'_m samples).
    The bounds' B_K and B'_K assume the first; the second is larger when n is not a multiple of b'_m."""
    b = table.batch.astype(np.float64)
    last = table.n - (table.steps - 1) * table.batch
    return table.steps / b, (table.steps - 1) / b + 1.0 / last


def apply_hyperparams(optimizer, lr: float, beta: float | None, gamma: float | None) -> None:
    """Write one epoch's (or step's) values into every param group (the one place schedules touch an
    optimizer). beta and gamma None: an optimizer without them (the Adam family), whose lr alone moves."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
        if beta is not None and gamma is not None:
            group["beta"], group["gamma"] = float(beta), float(gamma)


@dataclass(frozen=True)
class Span:
    """Steps [first, first + steps) of epoch ``epoch`` at batch ``batch``: the first covers positions
    [offset, offset + batch) of the epoch's permutation, each next one the following ``batch`` (the last
    of the epoch may be partial). ``global_step`` and ``samples``: steps and samples before its first step."""
    epoch: int
    first: int
    steps: int
    offset: int
    batch: int
    global_step: int
    samples: int
    # the schedule's batch where ``batch`` is cut short to end a branch exactly at its length (its last
    # step, a partial one); None: ``batch`` is the schedule's
    scheduled_batch: int | None = None
    # whole epochs ``epoch`` .. ``epoch + repeat - 1``, each these ``steps`` from its start (offset 0)
    repeat: int = 1

    @property
    def end(self) -> int:
        """The step of its epoch (of each, where it repeats) after its last."""
        return self.first + self.steps

    @property
    def total_steps(self) -> int:
        return self.steps * self.repeat

    def holds(self, epoch: int) -> bool:
        return self.epoch <= epoch < self.epoch + self.repeat

    def consumed(self, n: int) -> int:
        """The samples its steps train on, of an epoch of ``n`` (the last step of an epoch may be partial;
        a span that repeats: over all its epochs)."""
        return min(self.steps * self.batch, n - self.offset) + (self.repeat - 1) * n

    def in_epoch(self, epoch: int, n: int):
        """The span as it is in epoch ``epoch`` alone (itself where it does not repeat); the same type, so
        a subclass's fields carry over."""
        if self.repeat == 1:
            return self
        if not self.holds(epoch):
            raise ValueError(f"epoch {epoch} is not in the span's epochs {self.epoch}-{self.epoch + self.repeat - 1}")
        k = epoch - self.epoch
        return dataclasses.replace(self, epoch=epoch, global_step=self.global_step + k * self.steps,
                                   samples=self.samples + k * n, repeat=1)

    def start(self, step: int) -> int:
        """Where step ``step`` of the epoch starts in the epoch's permutation."""
        return self.offset + (step - self.first) * self.batch

    def size(self, step: int, n: int) -> int:
        """The samples of step ``step`` (the epoch's last may have fewer than the batch)."""
        return min(self.batch, n - self.start(step))


@dataclass(frozen=True)
class StepPlan:
    """A run's steps as spans (see the module docstring), with ``n`` samples per epoch and
    ``tokens_per_sample`` tokens per sample (None: tokens are not counted)."""
    spans: tuple
    n: int
    unit: str
    tokens_per_sample: int | None = None

    @property
    def epochs(self) -> int:
        """Epochs the run trains in (the last may be cut short by a duration in steps, samples or tokens)."""
        last = self.spans[-1]
        return last.epoch + last.repeat

    @property
    def total_steps(self) -> int:
        last = self.spans[-1]
        return last.global_step + last.total_steps

    @property
    def total_samples(self) -> int:
        last = self.spans[-1]
        return last.samples + last.consumed(self.n)

    @property
    def total_tokens(self) -> int | None:
        return None if self.tokens_per_sample is None else self.total_samples * self.tokens_per_sample

    def length(self, unit: str) -> int:
        """The run's length in ``unit``."""
        return {"epoch": self.epochs, "step": self.total_steps, "sample": self.total_samples,
                "token": self.total_samples * (self.tokens_per_sample or 1)}[unit]

    def steps_in(self, epoch: int) -> int:
        """The steps of epoch ``epoch`` in this plan."""
        return max((s.end for s in self.spans if s.holds(epoch)), default=0)

    def epoch_spans(self) -> list:
        """The spans with each repeating one written out per epoch (a per-epoch view: as long as the run's
        epochs)."""
        return [s.in_epoch(e, self.n) for s in self.spans for e in range(s.epoch, s.epoch + s.repeat)]

    def positions(self) -> dict:
        """Per step k of the run (numpy arrays of length K): ``epoch``, ``step`` (= k), ``samples`` before
        it, ``batch`` (scheduled b_k) and ``size`` (the samples it trains on)."""
        parts: dict[str, list] = {key: [] for key in ("epoch", "step", "samples", "batch", "size")}
        for s in self.spans:
            i = np.arange(s.steps, dtype=np.int64)
            r = np.arange(s.repeat, dtype=np.int64)[:, None]          # the epochs it repeats over, by row
            parts["epoch"].append(np.broadcast_to(s.epoch + r, (s.repeat, s.steps)).ravel())
            parts["step"].append((s.global_step + r * s.steps + i).ravel())
            parts["samples"].append((s.samples + r * self.n + i * s.batch).ravel())
            parts["batch"].append(np.full(s.total_steps, s.batch, dtype=np.int64))
            parts["size"].append(np.tile(np.minimum(s.batch, self.n - (s.offset + i * s.batch)), s.repeat))
        return {key: np.concatenate(v) for key, v in parts.items()}

    def position_at(self, step: int) -> dict:
        """Where global step ``step`` starts: {epoch, step (in the epoch), global_step, samples, tokens}
        (``step`` = total_steps: the run's end)."""
        for s in self.spans:
            if s.global_step <= step < s.global_step + s.total_steps:
                e, k = divmod(step - s.global_step, s.steps)
                samples = s.samples + e * self.n + k * s.batch
                return {"epoch": s.epoch + e, "step": s.first + k, "global_step": step, "samples": samples,
                        "tokens": samples * (self.tokens_per_sample or 0)}
        if step == self.total_steps:
            return {"epoch": self.epochs, "step": 0, "global_step": step, "samples": self.total_samples,
                    "tokens": self.total_samples * (self.tokens_per_sample or 0)}
        raise ValueError(f"step {step} is not in the plan's {self.total_steps} steps")

    def unit_positions(self, unit: str | None = None, positions: dict | None = None) -> np.ndarray:
        """Each step's position in ``unit`` (default: the plan's): where its schedules are evaluated."""
        p = positions if positions is not None else self.positions()
        unit = unit or self.unit
        if unit == "token":
            return p["samples"] * (self.tokens_per_sample or 1)
        return p[{"epoch": "epoch", "step": "step", "sample": "samples"}[unit]]

    def sequences(self, schedule: Schedule, first_batch: int | None = None) -> StepSequences:
        """alpha_k, beta_k, gamma_k, b_k over the run's steps: each step's hyper-parameters at its
        position (in the epoch unit, its epoch's values, as :func:`step_sequences` of the epoch table)."""
        p = self.positions()
        lr, beta, gamma = schedule.hyperparams(self.unit_positions(positions=p), p["batch"], first_batch)
        return StepSequences(lr=np.asarray(lr, dtype=np.float64), beta=np.asarray(beta, dtype=np.float64),
                             gamma=np.asarray(gamma, dtype=np.float64), batch=p["batch"])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _Walk:
    """Where the walk of :func:`plan_steps` stands: before global step ``step``, step ``in_epoch`` of
    epoch ``epoch``, ``offset`` samples of it consumed, ``samples`` over the run."""
    epoch: int = 0
    in_epoch: int = 0
    offset: int = 0
    step: int = 0
    samples: int = 0

    def at(self, unit: str, tokens_per_sample: int) -> int:
        return {"epoch": self.epoch, "step": self.step, "sample": self.samples,
                "token": self.samples * tokens_per_sample}[unit]

    def steps_to(self, unit: str, target: int, batch: int, tokens_per_sample: int) -> int:
        """Full steps of ``batch`` until the position in ``unit`` is at least ``target`` (>= 1)."""
        if unit == "step":
            return max(1, target - self.step)
        per_step = batch * (tokens_per_sample if unit == "token" else 1)
        return max(1, _ceil_div(target - self.at(unit, tokens_per_sample), per_step))


def _whole_epochs(walk: _Walk, unit: str, n: int, batch: int, change: int | None, duration: tuple,
                  tps: int, branch: tuple | None, left: int | None) -> int:
    """How many whole epochs from the walk's (at an epoch's start) the walk of :func:`plan_steps` would
    make one span each at ``batch``, all alike: the epochs k >= 0 whose every step comes before the batch's
    next ``change`` (its last step may reach past it, as a span's does), that end within the duration,
    and, on a branch, before its branch step or within the samples ``left``."""
    steps = _ceil_div(n, batch)

    def fitting(at: int, limit: int, per_epoch: int, per_step: int) -> int:
        # epochs k with at + k per_epoch < limit - (steps - 1) per_step: k's last step starts before limit
        return _ceil_div(limit - (steps - 1) * per_step - at, per_epoch)

    def along(unit_: str) -> tuple[int, int]:          # (per epoch, per step) in ``unit_``
        return {"step": (steps, 1), "sample": (n, batch), "token": (n * tps, batch * tps)}[unit_]

    counts = [] if change is None else [fitting(walk.at(unit, tps), change, *along(unit))]
    d_unit, amount = duration
    if left is not None:                 # a branch ending in samples or tokens: whole steps of the samples left
        counts.append((left - steps * batch) // n + 1)
    elif d_unit == "epoch":
        counts.append(amount - walk.epoch)
    else:
        counts.append(fitting(walk.at(d_unit, tps), amount, *along(d_unit)))
    if branch is not None and walk.step < branch[0]:
        counts.append((branch[0] - walk.step) // steps)
    return max(1, min(counts))


def plan_steps(batch_at, next_change, unit: str, n: int, duration: tuple, tokens_per_sample: int | None = None,
               start: tuple | None = None, branch: tuple | None = None, repeat_epochs: bool = True) -> StepPlan:
    """The run as spans, from its first step (or from ``start`` = (epoch, step in epoch, offset,
    global step, samples)) to the end of ``duration`` = (unit, amount): M epochs, or steps, samples or
    tokens, the run ending after the first step that reaches the amount.

    ``batch_at(u)``: the batch of a step that starts at position u in ``unit``; ``next_change(u)``: the
    first position after u where it may change (None: never). In the unit ``epoch`` the batch is the
    epoch's. ``branch`` = (global step S, factor f): from step S on every batch is f times the schedule's
    (a branch of a run at S; the steps before S are the run's own), and a duration in samples or tokens
    ends exactly at its amount: the last step takes only the samples left (a partial step, its span's
    ``scheduled_batch`` the batch it was cut from), so branches of every factor end at one position. A
    batch above ``n`` raises BatchTooLarge naming where. ``repeat_epochs`` False: one span per epoch even
    where whole epochs repeat (the walk epoch by epoch, which the tests compare the jumps with)."""
    tps = tokens_per_sample or 1
    d_unit, amount = duration
    walk = _Walk(*start) if start is not None else _Walk()
    spans: list[Span] = []

    def done() -> bool:
        return walk.at(d_unit, tps) >= amount

    while not done():
        u = walk.at(unit, tps)
        batch = int(batch_at(u))
        if branch is not None and walk.step >= branch[0]:
            batch *= branch[1]
        if batch > n:
            raise BatchTooLarge(batch, n, unit, u)
        scheduled, left = None, None
        if branch is not None and d_unit in ("sample", "token"):     # samples left to the branch's end
            left = _ceil_div(amount - walk.at(d_unit, tps), tps if d_unit == "token" else 1)
            if batch > left:
                scheduled, batch = batch, left
        steps = _ceil_div(n - walk.offset, batch)            # to the epoch's end
        change = None
        if unit != "epoch":
            change = next_change(u)
            if change is not None:
                steps = min(steps, walk.steps_to(unit, change, batch, tps))
        if left is not None:                                  # whole steps only: the rest is a partial step
            steps = min(steps, max(1, left // batch))
        elif d_unit != "epoch":
            steps = min(steps, walk.steps_to(d_unit, amount, batch, tps))
        if branch is not None and walk.step < branch[0]:
            steps = min(steps, branch[0] - walk.step)
        repeat = 1
        if repeat_epochs and unit != "epoch" and walk.offset == 0 and scheduled is None and steps * batch >= n:
            repeat = _whole_epochs(walk, unit, n, batch, change, duration, tps, branch, left)
        span = Span(walk.epoch, walk.in_epoch, steps, walk.offset, batch, walk.step, walk.samples, scheduled, repeat)
        spans.append(span)
        if len(spans) > MAX_SPANS:
            raise ScheduleError("batch", batch, f"a schedule that changes the batch at most {MAX_SPANS} times "
                                "over the run")
        consumed = span.consumed(n)
        walk.in_epoch += steps
        walk.step += span.total_steps
        walk.epoch += repeat - 1
        walk.offset += consumed - (repeat - 1) * n
        walk.samples += consumed
        if walk.offset == n:
            walk.epoch, walk.in_epoch, walk.offset = walk.epoch + 1, 0, 0
    if not spans:
        raise ScheduleError(d_unit, amount, "a duration of at least one step")
    return StepPlan(tuple(spans), int(n), unit, tokens_per_sample)
